import type { AppContext } from '../context.js';
import { endAttempt, repeatOrFenceMiss } from './complete.js';
import { recordEvent } from './events.js';
import { BILL_WORKER_TIME, pricePerSecond, runningSql } from './lease.js';
import { leasedJobs } from './leased-jobs.js';
import { notifyAfterCommit } from './notify.js';
import type { JobRow } from './types.js';

/**
 * A worker shutting down hands its job back: the job is `pending` again at once (no backoff: nothing
 * failed), resuming from its latest checkpoint, and the attempt is given back, so graceful shutdowns
 * never use up the job's retries. A job whose owner asked to cancel it ends `cancelled`. `by`: who
 * handed it back, as the event records it — the worker, or the server for a worker that hung up
 * before its claim was answered.
 */
export async function releaseJob(
  ctx: AppContext,
  jobId: string,
  leaseToken: string,
  by: 'worker' | 'server',
): Promise<JobRow> {
  leasedJobs.forget(ctx.knex, jobId, leaseToken); // this lease completes nothing now
  return ctx.knex.transaction(async (trx) => {
    const updated = await trx.raw(
      `
      UPDATE jobs SET
        status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'pending' END,
        phase = CASE WHEN cancel_requested THEN phase
          WHEN kind = 'training' THEN 'queued' ELSE 'initializing' END,
        run_at = now(),
        resume_checkpoint = COALESCE((
          SELECT f.name FROM files f
          WHERE f.owner_kind = 'checkpoint' AND f.owner_id = jobs.id
          ORDER BY f.step DESC NULLS LAST, f.created_at DESC LIMIT 1
        ), resume_checkpoint),
        -- the claim counted this attempt; a hand-back is not a failure, so the limit moves up by one
        max_attempts = max_attempts + CASE WHEN cancel_requested THEN 0 ELSE 1 END,
        finished_at = CASE WHEN cancel_requested THEN now() ELSE NULL END,
        ${BILL_WORKER_TIME},
        lease_expires_at = NULL,
        updated_at = now()
      -- fencing: only the current attempt of a running job may hand it back
      WHERE id = :jobId AND lease_token = :leaseToken AND ${runningSql()}
      RETURNING *`,
      { jobId, leaseToken, pricePerSecond: pricePerSecond(ctx) },
    );
    const job = updated.rows[0] as JobRow | undefined;
    if (!job) return repeatOrFenceMiss(trx, jobId, leaseToken, ['pending', 'cancelled']);
    const released = job.status === 'pending';
    await endAttempt(trx, job, released ? 'released' : 'cancelled');
    await recordEvent(trx, job.id, released ? 'released' : 'cancelled', {
      by,
      attempt: job.attempt,
      resume_checkpoint: job.resume_checkpoint,
    });
    if (released) notifyAfterCommit(ctx, trx);
    return job;
  });
}
