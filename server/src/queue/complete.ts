import type { Knex } from 'knex';
import type { AppContext } from '../context.js';
import { registerJobOutputs } from '../services/registry.js';
import { recordEvent } from './events.js';
import { BILL_WORKER_TIME, type Db, fenceMissError, pricePerSecond } from './lease.js';
import type { JobRow } from './types.js';

/**
 * A terminal transition found no running row for this token. When the same attempt already made
 * the very transition (a retried request whose first answer was lost), it is answered as done;
 * otherwise the lease is gone (or the job never existed).
 */
export async function repeatOrFenceMiss(
  db: Db,
  jobId: string,
  leaseToken: string,
  endedAs: JobRow['status'][],
): Promise<JobRow> {
  const row = (await db('jobs').where({ id: jobId }).first()) as JobRow | undefined;
  if (row && row.lease_token === leaseToken && endedAs.includes(row.status)) return row;
  throw await fenceMissError(db, jobId);
}

/** Closes the attempt's row with how it ended. */
export async function endAttempt(
  db: Db,
  job: Pick<JobRow, 'id' | 'attempt'>,
  outcome: string,
  error: { code?: string | null; message?: string | null } = {},
): Promise<void> {
  await db.raw(
    `
    UPDATE job_attempts SET outcome = :outcome, error_code = :code, error_message = :message, ended_at = now()
    WHERE job_id = :jobId AND attempt = :attempt AND outcome = 'running'`,
    {
      jobId: job.id,
      attempt: job.attempt,
      outcome,
      code: error.code ?? null,
      message: error.message ?? null,
    },
  );
}

/**
 * Completes the current attempt: the job becomes `completed` with its result, the adapter and
 * output model it produced are registered, and the registry's ids are stored on the job.
 */
export async function completeJob(
  ctx: AppContext,
  jobId: string,
  leaseToken: string,
  result: Record<string, unknown>,
): Promise<JobRow> {
  return ctx.knex.transaction(async (trx: Knex.Transaction) => {
    const updated = await trx.raw(
      `
      UPDATE jobs SET
        status = 'completed',
        phase = 'done',
        results = :result::jsonb,
        ${BILL_WORKER_TIME},
        current_step = GREATEST(current_step, COALESCE(total_steps, 0)),
        lease_expires_at = NULL,
        -- a completed run's earlier failures are history (kept on the attempts)
        error_code = NULL,
        error_message = NULL,
        finished_at = now(),
        updated_at = now()
      -- fencing: only the current attempt of a running job may complete it
      WHERE id = :jobId AND lease_token = :leaseToken AND status = 'running'
      RETURNING *`,
      { jobId, leaseToken, result: JSON.stringify(result), pricePerSecond: pricePerSecond(ctx) },
    );
    const job = updated.rows[0] as JobRow | undefined;
    if (!job) return repeatOrFenceMiss(trx, jobId, leaseToken, ['completed']);

    const registered = await registerJobOutputs(ctx, trx, job, result);
    const [final] = (await trx('jobs')
      .where({ id: job.id })
      .update({
        output_model_id: registered.modelId,
        adapter_name: registered.adapterName,
      })
      .returning('*')) as JobRow[];
    await endAttempt(trx, job, 'completed');
    await recordEvent(trx, job.id, 'completed', {
      attempt: job.attempt,
      output_model_id: registered.modelId,
      adapter_name: registered.adapterName,
    });
    return final!;
  });
}
