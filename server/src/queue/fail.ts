import type { AppContext } from '../context.js';
import { endAttempt, repeatOrFenceMiss } from './complete.js';
import { recordEvent } from './events.js';
import { BILL_WORKER_TIME, pricePerSecond, runningSql } from './lease.js';
import { leasedJobs } from './leased-jobs.js';
import { notifyAfterCommit } from './notify.js';
import type { JobRow } from './types.js';

export interface FailInput {
  code: string;
  message: string;
  retryable: boolean;
}

/** The delay before retry `attempt + 1`, seconds: base · 2^(attempt−1), capped. Mirrors the SQL. */
export const retryDelaySeconds = (ctx: Pick<AppContext, 'config'>, attempt: number): number =>
  Math.min(ctx.config.retryMaxSeconds, ctx.config.retryBaseSeconds * 2 ** Math.max(0, attempt - 1));

/**
 * Ends the current attempt as failed. A retryable failure with attempts left goes back to
 * `pending`, runnable after a capped exponential backoff and resuming from the latest checkpoint;
 * anything else (or a job whose owner asked to cancel) ends the job.
 */
export async function failJob(
  ctx: AppContext,
  jobId: string,
  leaseToken: string,
  input: FailInput,
): Promise<JobRow> {
  leasedJobs.forget(ctx.knex, jobId, leaseToken); // this lease completes nothing now
  return ctx.knex.transaction(async (trx) => {
    const updated = await trx.raw(
      `
      WITH decision AS (
        SELECT id,
          CASE
            -- the owner asked to stop: a failure while stopping ends it as cancelled
            WHEN cancel_requested THEN 'cancelled'
            WHEN :retryable AND attempt < max_attempts THEN 'pending'
            ELSE 'failed'
          END AS next_status
        FROM jobs
        WHERE id = :jobId AND lease_token = :leaseToken AND ${runningSql()}
        -- Lock the row before deciding: without it, a cancel committing meanwhile is missed (the UPDATE
        -- re-checks its WHERE on the new row but keeps this snapshot's next_status) and the job goes
        -- back to pending with cancel_requested set. The lock waits for the cancel and reads its row.
        FOR UPDATE
      )
      UPDATE jobs SET
        status = decision.next_status,
        -- back in the queue, the job shows as waiting again
        phase = CASE WHEN decision.next_status = 'pending'
          THEN (CASE WHEN kind = 'training' THEN 'queued' ELSE 'initializing' END) ELSE phase END,
        run_at = CASE WHEN decision.next_status = 'pending'
          -- capped exponential backoff, from the database clock
          THEN now() + make_interval(secs => least(:capSeconds, :baseSeconds * power(2, attempt - 1)))
          ELSE run_at END,
        resume_checkpoint = CASE WHEN decision.next_status = 'pending' THEN COALESCE((
          SELECT f.name FROM files f
          WHERE f.owner_kind = 'checkpoint' AND f.owner_id = jobs.id
          ORDER BY f.step DESC NULLS LAST, f.created_at DESC LIMIT 1
        ), resume_checkpoint) ELSE resume_checkpoint END,
        error_code = CASE WHEN decision.next_status = 'failed' THEN :code ELSE error_code END,
        error_message = CASE WHEN decision.next_status = 'failed' THEN :message ELSE error_message END,
        finished_at = CASE WHEN decision.next_status = 'pending' THEN NULL ELSE now() END,
        ${BILL_WORKER_TIME},
        lease_expires_at = NULL,
        updated_at = now()
      FROM decision
      -- fencing: only the current attempt of a running job may fail it
      WHERE jobs.id = decision.id AND jobs.lease_token = :leaseToken AND ${runningSql()}
      RETURNING jobs.*, jobs.run_at <= now() AS runnable_now`,
      {
        jobId,
        leaseToken,
        retryable: input.retryable,
        code: input.code,
        message: input.message,
        baseSeconds: ctx.config.retryBaseSeconds,
        capSeconds: ctx.config.retryMaxSeconds,
        pricePerSecond: pricePerSecond(ctx),
      },
    );
    const row = updated.rows[0] as (JobRow & { runnable_now: boolean }) | undefined;
    if (!row) return repeatOrFenceMiss(trx, jobId, leaseToken, ['pending', 'failed', 'cancelled']);
    const { runnable_now: runnableNow, ...job } = row;

    const outcome = job.status === 'pending' ? 'retry' : job.status;
    await endAttempt(trx, job, outcome, input);
    await recordEvent(trx, job.id, job.status === 'pending' ? 'retry' : job.status, {
      attempt: job.attempt,
      error: { code: input.code, message: input.message },
      retryable: input.retryable,
      ...(job.status === 'pending' ? { run_at: job.run_at } : {}),
    });
    // A retry waiting out its backoff would wake a claim for nothing: the claims' recheck finds it.
    if (job.status === 'pending' && runnableNow) notifyAfterCommit(ctx, trx);
    return job;
  });
}
