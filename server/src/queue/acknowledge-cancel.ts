import type { AppContext } from '../context.js';
import { conflict } from '../errors.js';
import { endAttempt, repeatOrFenceMiss } from './complete.js';
import { recordEvent } from './events.js';
import { BILL_WORKER_TIME, pricePerSecond, runningSql } from './lease.js';
import { leasedJobs } from './leased-jobs.js';
import type { JobRow } from './types.js';

/**
 * The worker stopped after a heartbeat told it the job was cancelled: the job becomes
 * `cancelled`. Outputs uploaded before this call are kept.
 */
export async function acknowledgeCancel(ctx: AppContext, jobId: string, leaseToken: string): Promise<JobRow> {
  leasedJobs.forget(ctx.knex, jobId, leaseToken); // this lease completes nothing now
  return ctx.knex.transaction(async (trx) => {
    const updated = await trx.raw(
      `
      UPDATE jobs SET
        status = 'cancelled',
        ${BILL_WORKER_TIME},
        lease_expires_at = NULL,
        finished_at = now(),
        updated_at = now()
      -- fencing, and only a cancel someone asked for: a worker giving up on its own must fail instead
      WHERE id = :jobId AND lease_token = :leaseToken AND ${runningSql()} AND cancel_requested
      RETURNING *`,
      { jobId, leaseToken, pricePerSecond: pricePerSecond(ctx) },
    );
    const job = updated.rows[0] as JobRow | undefined;
    if (!job) {
      const current = await repeatOrFenceMiss(trx, jobId, leaseToken, ['cancelled', 'running']);
      if (current.status === 'running') {
        throw conflict(`No cancel was requested for ${jobId}; report a failure instead.`, 'conflict');
      }
      return current;
    }
    await endAttempt(trx, job, 'cancelled');
    await recordEvent(trx, job.id, 'cancelled', { by: 'worker', attempt: job.attempt });
    return job;
  });
}
