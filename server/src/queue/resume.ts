import type { AppContext } from '../context.js';
import { conflict, notFound } from '../errors.js';
import { reservableUsd, reserveBudget } from '../services/budget.js';
import { sealedSecretsJson } from './enqueue.js';
import { recordEvent } from './events.js';
import { notifyAfterCommit } from './notify.js';
import type { JobKind, JobRow } from './types.js';

/** The checkpoint a resume starts from: the named one, else the latest. */
async function pickCheckpoint(
  db: AppContext['knex'],
  jobId: string,
  name: string | undefined,
): Promise<{ name: string; step: number } | undefined> {
  const query = db('files').where({ owner_kind: 'checkpoint', owner_id: jobId });
  if (name) return query.andWhere({ name }).first('name', 'step');
  return query.orderByRaw('step DESC NULLS LAST, created_at DESC').first('name', 'step');
}

/**
 * Puts a failed or cancelled job back in the queue, to continue from a checkpoint, with `secrets`
 * (in clear; sealed here) in place of those erased when it ended; a paused job without a checkpoint
 * starts over. Unknown checkpoint → 404; a job in any other state, or with no checkpoint at all
 * (and not paused) → 409 job_not_resumable; a tenant whose budget
 * cannot hold the rest of the job's estimate → 402 insufficient_credits.
 */
export async function resumeJob(
  ctx: AppContext,
  tenantId: string,
  kind: JobKind,
  jobId: string,
  checkpointName: string | undefined,
  secrets?: Record<string, unknown>,
): Promise<JobRow> {
  return ctx.knex.transaction(async (trx) => {
    const job = (await trx('jobs').where({ id: jobId, tenant_id: tenantId, kind }).first()) as
      | JobRow
      | undefined;
    if (!job) throw notFound('job', jobId, 'job_id', 'job_not_found');
    const checkpoint = await pickCheckpoint(trx, jobId, checkpointName);
    if (checkpointName && !checkpoint) throw notFound('checkpoint', checkpointName, 'checkpoint');
    // a paused job without a checkpoint starts over; any other needs one
    if (!checkpoint && !job.paused_at) {
      throw conflict(`Job ${jobId} has no checkpoint to resume from.`, 'job_not_resumable');
    }
    // Pending again, it holds what is left of its estimate: 402 when that does not fit.
    const unspent = Number(job.cost_reserved) - Number(job.cost_accrued);
    await reserveBudget(trx, tenantId, reservableUsd(unspent, ctx.config.pricePerGpuHour));

    const updated = await trx.raw(
      `
      UPDATE jobs SET
        status = 'pending',
        phase = CASE WHEN kind = 'training' THEN 'queued' ELSE 'initializing' END,
        run_at = now(),
        resume_checkpoint = :checkpoint,
        cancel_requested = false,
        paused_at = NULL,
        -- the job's secrets were erased when it ended; the caller may give them again
        secrets = :secrets::jsonb,
        -- at least one more attempt, whatever the earlier ones used up
        max_attempts = GREATEST(max_attempts, attempt + 1),
        error_code = NULL,
        error_message = NULL,
        finished_at = NULL,
        updated_at = now()
      -- only a job that ended without success; the state check loses cleanly to a concurrent resume
      WHERE id = :jobId AND tenant_id = :tenantId AND status IN ('failed', 'cancelled')
      RETURNING *`,
      {
        jobId,
        tenantId,
        checkpoint: checkpoint?.name ?? null,
        secrets: sealedSecretsJson(ctx, jobId, secrets),
      },
    );
    const resumed = updated.rows[0] as JobRow | undefined;
    if (!resumed) {
      throw conflict(
        `Job ${jobId} is ${job.status}; only failed or cancelled jobs resume.`,
        'job_not_resumable',
      );
    }
    await recordEvent(trx, jobId, 'resumed', {
      checkpoint: checkpoint?.name ?? null,
      step: checkpoint?.step ?? 0,
    });
    notifyAfterCommit(ctx, trx);
    return resumed;
  });
}
