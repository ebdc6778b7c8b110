import type { AppContext } from '../context.js';
import { APPLY_PROGRESS, BILL_WORKER_TIME, fenceMissError, pricePerSecond } from './lease.js';

export interface HeartbeatAnswer {
  lease_expires_at: Date;
  cancel_requested: boolean;
}

/**
 * Extends the lease of a running attempt and applies its progress. The answer carries
 * `cancel_requested`, which is how a user's cancel reaches the worker. A stale token changes
 * nothing and is `409 lease_lost`.
 */
export async function heartbeatJob(
  ctx: AppContext,
  jobId: string,
  leaseToken: string,
  progress: Record<string, unknown> = {},
): Promise<HeartbeatAnswer> {
  const result = await ctx.knex.raw(
    `
    UPDATE jobs SET
      lease_expires_at = now() + make_interval(secs => :leaseSeconds),
      ${APPLY_PROGRESS},
      ${BILL_WORKER_TIME},
      updated_at = now()
    -- fencing: only the current attempt of a running job may extend its lease
    WHERE id = :jobId AND lease_token = :leaseToken AND status = 'running'
    RETURNING lease_expires_at, cancel_requested`,
    {
      jobId,
      leaseToken,
      leaseSeconds: ctx.config.leaseSeconds,
      progress: JSON.stringify(progress),
      pricePerSecond: pricePerSecond(ctx),
    },
  );
  const row = result.rows[0] as HeartbeatAnswer | undefined;
  if (!row) throw await fenceMissError(ctx.knex, jobId);
  return row;
}
