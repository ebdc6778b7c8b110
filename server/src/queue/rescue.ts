import type { AppContext } from '../context.js';
import { recordEvent } from './events.js';
import { expireLostGangs } from './gang.js';
import { notifyAfterCommit } from './notify.js';
import type { JobRow } from './types.js';

export interface RescueCounts {
  /** Back to `pending`, to resume from the latest checkpoint. */
  retried: number;
  /** Cancel was requested and the worker vanished: ended as `cancelled`. */
  cancelled: number;
  /** Out of attempts: ended as `failed` with `lease_expired`. */
  failed: number;
}

type Rescued = Pick<JobRow, 'id' | 'attempt' | 'status' | 'retries' | 'resume_checkpoint'>;

/**
 * One batch of the rescuer: running jobs whose lease lapsed (the worker died or lost the network)
 * go back to the queue, counted in `retries`, to resume from their latest checkpoint.
 */
export async function rescueExpiredLeases(ctx: AppContext, batchSize: number): Promise<RescueCounts> {
  return ctx.knex.transaction(async (trx) => {
    // a gang whose member (rank > 0) went silent loses its attempt like a silent rank 0
    await expireLostGangs(trx, batchSize);
    const result = await trx.raw(
      `
      WITH expired AS (
        SELECT id FROM jobs
        -- the database clock decides expiry, so servers with skewed clocks agree
        WHERE status = 'running' AND lease_expires_at < now()
        ORDER BY lease_expires_at
        -- another server's sweeper takes the other rows
        FOR UPDATE SKIP LOCKED
        LIMIT :batchSize
      )
      UPDATE jobs SET
        status = CASE
          WHEN cancel_requested THEN 'cancelled'
          -- a job that kills its worker every time must not loop forever
          WHEN attempt >= max_attempts THEN 'failed'
          ELSE 'pending' END,
        phase = CASE WHEN cancel_requested OR attempt >= max_attempts THEN phase
          WHEN kind = 'training' THEN 'queued' ELSE 'initializing' END,
        retries = retries + CASE WHEN cancel_requested OR attempt >= max_attempts THEN 0 ELSE 1 END,
        run_at = now(),
        resume_checkpoint = COALESCE((
          SELECT f.name FROM files f
          WHERE f.owner_kind = 'checkpoint' AND f.owner_id = jobs.id
          ORDER BY f.step DESC NULLS LAST, f.created_at DESC LIMIT 1
        ), resume_checkpoint),
        -- seed 000 calls a distillation whose process died training_error ("see the logs")
        error_code = CASE WHEN NOT cancel_requested AND attempt >= max_attempts
          THEN CASE WHEN kind = 'distillation' THEN 'training_error' ELSE 'lease_expired' END
          ELSE error_code END,
        error_message = CASE WHEN NOT cancel_requested AND attempt >= max_attempts
          THEN 'The worker stopped heartbeating on the last allowed attempt (lease expired).'
          ELSE error_message END,
        finished_at = CASE WHEN cancel_requested OR attempt >= max_attempts THEN now() ELSE NULL END,
        lease_expires_at = NULL,
        updated_at = now()
      FROM expired
      -- re-checked under the lock: a heartbeat that won the race keeps its job
      WHERE jobs.id = expired.id AND jobs.status = 'running' AND jobs.lease_expires_at < now()
      RETURNING jobs.id, jobs.attempt, jobs.status, jobs.retries, jobs.resume_checkpoint`,
      { batchSize },
    );
    const rescued = result.rows as Rescued[];
    if (rescued.length === 0) return { retried: 0, cancelled: 0, failed: 0 };
    await trx.raw(
      `
      UPDATE job_attempts a SET outcome = 'lease_expired', ended_at = now()
      FROM jsonb_to_recordset(:attempts::jsonb) AS r(job_id text, attempt int)
      WHERE a.job_id = r.job_id AND a.attempt = r.attempt AND a.outcome = 'running'`,
      { attempts: JSON.stringify(rescued.map((r) => ({ job_id: r.id, attempt: r.attempt }))) },
    );
    for (const job of rescued) {
      const kind = job.status === 'pending' ? 'retry' : job.status;
      await recordEvent(trx, job.id, kind, {
        reason: 'lease_expired',
        attempt: job.attempt,
        retries: job.retries,
        resume_checkpoint: job.resume_checkpoint,
      });
    }
    const retried = rescued.filter((r) => r.status === 'pending').length;
    if (retried > 0) notifyAfterCommit(ctx, trx, retried);
    return {
      retried,
      cancelled: rescued.filter((r) => r.status === 'cancelled').length,
      failed: rescued.filter((r) => r.status === 'failed').length,
    };
  });
}
