/**
 * Budgets. A tenant's limit covers what its jobs have accrued plus what its live jobs (pending or
 * running) may still cost: each job reserves its estimate (at least MIN_RESERVATION_USD where worker
 * time is billed) when it is created, and the reservation stops counting once the job ends (only
 * what it accrued stays spent).
 * Reservations are taken under a lock on the tenant's row, so concurrent creates see each other's.
 * Running jobs whose tenant went over the limit are stopped by the heartbeat (`queue/heartbeat.ts`).
 */
import type { Knex } from 'knex';
import type { AppContext } from '../context.js';
import { ApiError } from '../errors.js';
import type { Schemas } from '../http.js';

/** Dollars and cents, or hundredths of a cent for amounts under a cent. */
const usd = (value: number) => `$${value.toFixed(value > 0 && value < 0.01 ? 4 : 2)}`;
/** Money is kept to 4 decimals (the columns' scale); answers round to the same. */
const money = (value: number) => Number(value.toFixed(4));
/**
 * The least a job must find left in its tenant's budget to be created (then held until it ends or
 * accrues as much) or resumed, where worker time is billed (TUNERY_PRICE_PER_GPU_HOUR above 0): one
 * estimated at nothing (a merge, a native prompt optimization) still bills its worker's time, and a
 * tenant with nothing left would only have it stopped at its first heartbeat. Where worker time is
 * free, such a job costs nothing and holds nothing.
 */
export const MIN_RESERVATION_USD = 0.0001;

/**
 * An estimate as it is reserved: rounded up to the columns' scale, so the check and the hold agree,
 * and at least MIN_RESERVATION_USD where worker time costs something (`pricePerGpuHour` above 0).
 */
export const reservableUsd = (estimate: number, pricePerGpuHour: number) =>
  Math.max(
    pricePerGpuHour > 0 ? MIN_RESERVATION_USD : 0,
    Math.ceil(Number((estimate * 1e4).toFixed(6))) / 1e4,
  );

/** Job states whose unspent estimate is held against the budget. */
const LIVE = `status IN ('pending', 'running')`;

interface Spending {
  /** What every job of the tenant has accrued. */
  spent: number;
  /** What live jobs may still cost: their reservations less what they accrued so far. */
  reserved: number;
}

/** The tenant's spending (numeric comes back as a string from pg). */
async function spendingOf(db: Knex | Knex.Transaction, tenantId: string): Promise<Spending> {
  const result = await db.raw(
    `
    SELECT COALESCE(SUM(cost_accrued), 0) AS spent,
      COALESCE(SUM(CASE WHEN ${LIVE} THEN GREATEST(cost_reserved - cost_accrued, 0) ELSE 0 END), 0) AS reserved
    FROM jobs WHERE tenant_id = ?`,
    [tenantId],
  );
  const row = result.rows[0] as { spent: string | number; reserved: string | number };
  return { spent: Number(row.spent), reserved: Number(row.reserved) };
}

const limitOf = (row: { budget_limit_usd?: string | number | null } | undefined) =>
  row?.budget_limit_usd == null ? null : Number(row.budget_limit_usd);

const remainingOf = (limit: number, spending: Spending) =>
  money(Math.max(0, limit - spending.spent - spending.reserved));

/** The tenant's limit, spending and what is left (null limit: unlimited). */
export async function getBudget(
  ctx: Pick<AppContext, 'knex'>,
  tenantId: string,
  db: Knex | Knex.Transaction = ctx.knex,
): Promise<Schemas['Budget']> {
  const limit = limitOf(await db('tenants').where({ id: tenantId }).first('budget_limit_usd'));
  const spending = await spendingOf(db, tenantId);
  return {
    tenant_id: tenantId,
    limit_usd: limit,
    spent_usd: money(spending.spent),
    remaining_usd: limit == null ? null : remainingOf(limit, spending),
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
 * Checks that `estimatedUsd` fits in what is left of the tenant's budget, holding the tenant's row
 * lock until `trx` ends: the caller inserts the job (with `cost_reserved`) in the same transaction,
 * so a concurrent create waits here and then counts this one. Refused: `402 insufficient_credits`.
 * No limit set means always allowed.
 */
export async function reserveBudget(
  trx: Knex.Transaction,
  tenantId: string,
  estimatedUsd: number,
): Promise<void> {
  // A separate statement before the sums: they must be read after the lock is ours, from a snapshot
  // that includes the jobs whose creates held it before us (READ COMMITTED takes one per statement).
  // NO KEY UPDATE, not UPDATE: the caller may already hold the key-share lock a foreign key to the
  // tenant takes (its new dataset's row), and upgrading that to UPDATE deadlocks two creates.
  const limit = limitOf(
    await trx('tenants').where({ id: tenantId }).forNoKeyUpdate().first('budget_limit_usd'),
  );
  if (limit == null) return;
  const remaining = remainingOf(limit, await spendingOf(trx, tenantId));
  if (estimatedUsd > remaining) {
    throw new ApiError(
      402,
      'insufficient_credits',
      `Estimated cost ${usd(estimatedUsd)} exceeds the ${usd(remaining)} left in your budget.`,
    );
  }
}

/** Whether what the tenant's jobs accrued has gone past its limit (running jobs are then stopped). */
export async function isOverBudget(db: Knex | Knex.Transaction, tenantId: string): Promise<boolean> {
  const limit = limitOf(await db('tenants').where({ id: tenantId }).first('budget_limit_usd'));
  if (limit == null) return false;
  return (await spendingOf(db, tenantId)).spent > limit;
}
