import type { Knex } from 'knex';
import type { AppContext } from '../context.js';
import { ApiError } from '../errors.js';
import type { Schemas } from '../http.js';

const usd = (value: number) => `$${value.toFixed(2)}`;
/** Money is kept to 4 decimals (the columns' scale); answers round to the same. */
const money = (value: number) => Number(value.toFixed(4));

/** What every job of the tenant has accrued (numeric comes back as a string from pg). */
export async function spentUsd(db: Knex | Knex.Transaction, tenantId: string): Promise<number> {
  const row = await db('jobs').where({ tenant_id: tenantId }).sum({ spent: 'cost_accrued' }).first();
  return Number(row?.spent ?? 0);
}

/** The tenant's limit, spending and what is left (null limit: unlimited). */
export async function getBudget(
  ctx: Pick<AppContext, 'knex'>,
  tenantId: string,
  db: Knex | Knex.Transaction = ctx.knex,
): Promise<Schemas['Budget']> {
  const tenant = await db('tenants').where({ id: tenantId }).first('budget_limit_usd');
  const limit = tenant?.budget_limit_usd == null ? null : Number(tenant.budget_limit_usd);
  const spent = await spentUsd(db, tenantId);
  return {
    tenant_id: tenantId,
    limit_usd: limit,
    spent_usd: money(spent),
    remaining_usd: limit == null ? null : money(Math.max(0, limit - spent)),
  };
}

/** Sets (or, with null, removes) the tenant's spending limit. */
export async function setBudgetLimit(
  ctx: Pick<AppContext, 'knex'>,
  tenantId: string,
  limitUsd: number | null,
): Promise<Schemas['Budget']> {
  await ctx
    .knex('tenants')
    .insert({ id: tenantId, budget_limit_usd: limitUsd })
    .onConflict('id')
    .merge(['budget_limit_usd']);
  return getBudget(ctx, tenantId);
}

/**
 * Refuses work whose estimated cost exceeds what is left of the tenant's budget:
 * `402 insufficient_credits`. No limit set means always allowed.
 */
export async function assertWithinBudget(
  ctx: Pick<AppContext, 'knex'>,
  tenantId: string,
  estimatedUsd: number,
  db: Knex | Knex.Transaction = ctx.knex,
): Promise<void> {
  const budget = await getBudget(ctx, tenantId, db);
  if (budget.limit_usd == null || budget.remaining_usd == null) return;
  if (estimatedUsd > budget.remaining_usd) {
    throw new ApiError(
      402,
      'insufficient_credits',
      `Estimated cost ${usd(estimatedUsd)} exceeds the ${usd(budget.remaining_usd)} left in your budget.`,
    );
  }
}
