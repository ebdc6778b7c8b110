import type { AppContext } from '../context.js';
import { ApiError } from '../errors.js';
import { isOverBudget } from '../services/budget.js';
import { failJob } from './fail.js';
import {
  APPLY_PROGRESS,
  BILL_WORKER_TIME_AND_TEACHER,
  fenceMissError,
  pricePerSecond,
  runningSql,
} from './lease.js';

export interface HeartbeatAnswer {
  lease_expires_at: Date;
  cancel_requested: boolean;
}

/**
 * Extends the lease of a running attempt and applies its progress. The answer carries
 * `cancel_requested`, which is how a user's cancel reaches the worker. A stale token changes
 * nothing and is `409 lease_lost`. Heartbeats bill worker time, so this is where a tenant's spending
 * crosses its budget: the job is then failed with `insufficient_credits` (its checkpoints stay, to
 * resume once the limit is raised) and the worker told to drop it (`409 lease_lost`).
 */
export async function heartbeatJob(
  ctx: AppContext,
  jobId: string,
  leaseToken: string,
  progress: Record<string, unknown> = {},
): Promise<HeartbeatAnswer> {
  const result = await ctx.knex.raw(
    `
    WITH beat AS (
      UPDATE jobs SET
        lease_expires_at = now() + make_interval(secs => :leaseSeconds),
        ${APPLY_PROGRESS},
        ${BILL_WORKER_TIME_AND_TEACHER},
        updated_at = now()
      -- fencing: only the current attempt of a running job may extend its lease
      WHERE id = :jobId AND lease_token = :leaseToken AND ${runningSql()}
      RETURNING lease_expires_at, cancel_requested, tenant_id, lease_owner
    ),
    -- a worker busy with a long job claims nothing, but it is there: its heartbeats say so
    seen AS (UPDATE workers SET last_seen_at = now() FROM beat WHERE workers.id = beat.lease_owner)
    SELECT lease_expires_at, cancel_requested, tenant_id FROM beat`,
    {
      jobId,
      leaseToken,
      leaseSeconds: ctx.config.leaseSeconds,
      progress: JSON.stringify(progress),
      pricePerSecond: pricePerSecond(ctx),
    },
  );
  const row = result.rows[0] as (HeartbeatAnswer & { tenant_id: string }) | undefined;
  if (!row) throw await fenceMissError(ctx.knex, jobId);
  if (await isOverBudget(ctx.knex, row.tenant_id)) await stopOverBudget(ctx, jobId, leaseToken);
  return { lease_expires_at: row.lease_expires_at, cancel_requested: row.cancel_requested };
}

/** Ends the attempt as failed (not retried) and answers the worker that the job is no longer its. */
async function stopOverBudget(ctx: AppContext, jobId: string, leaseToken: string): Promise<never> {
  await failJob(ctx, jobId, leaseToken, {
    code: 'insufficient_credits',
    message:
      'The budget is spent; the job was stopped. Raise the limit and resume it from its last checkpoint.',
    retryable: false,
  });
  throw new ApiError(
    409,
    'lease_lost',
    `Job ${jobId} was stopped: the budget is spent; drop it.`,
    'lease_token',
  );
}
