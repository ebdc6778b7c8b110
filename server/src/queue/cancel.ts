import type { AppContext } from '../context.js';
import { conflict, notFound } from '../errors.js';
import { recordEvent } from './events.js';
import type { JobKind, JobRow } from './types.js';

/**
 * A user's cancel, or pause (`pause`: the same stop, remembered in `paused_at`, so that a resume
 * without a checkpoint starts over). A pending job stops at once; a running one gets
 * `cancel_requested`, which its worker reads in the next heartbeat answer before acknowledging.
 * A paused job can still be cancelled (it stays cancelled, no longer paused). A terminal job is
 * `409 job_already_finished`; a distillation keeps seed 000's code for it, `job_already_running`.
 */
export async function cancelJob(
  ctx: AppContext,
  tenantId: string,
  kind: JobKind,
  jobId: string,
  { pause = false }: { pause?: boolean } = {},
): Promise<JobRow> {
  return ctx.knex.transaction(async (trx) => {
    const updated = await trx.raw(
      `
      UPDATE jobs SET
        status = CASE WHEN status = 'pending' THEN 'cancelled' ELSE status END,
        cancel_requested = true,
        paused_at = CASE WHEN :pause THEN COALESCE(paused_at, now()) ELSE NULL END,
        finished_at = CASE WHEN status = 'pending' THEN now() ELSE finished_at END,
        updated_at = now()
      -- only the owner's live (or paused) jobs; the state check makes a cancel racing a completion lose cleanly
      WHERE id = :jobId AND tenant_id = :tenantId AND kind = :kind
        AND (status IN ('pending', 'running') OR (status = 'cancelled' AND paused_at IS NOT NULL))
      RETURNING *`,
      { jobId, tenantId, kind, pause },
    );
    const job = updated.rows[0] as JobRow | undefined;
    if (!job) throw await cancelRefusal(trx, tenantId, kind, jobId);
    const stopped = job.status === 'cancelled';
    await recordEvent(trx, job.id, pause ? 'paused' : stopped ? 'cancelled' : 'cancel_requested', {
      by: 'user',
    });
    return job;
  });
}

async function cancelRefusal(db: AppContext['knex'], tenantId: string, kind: JobKind, jobId: string) {
  const row = await db('jobs').where({ id: jobId, tenant_id: tenantId, kind }).first('status');
  if (!row) return notFound('job', jobId, 'job_id', 'job_not_found');
  const code = kind === 'distillation' ? 'job_already_running' : 'job_already_finished';
  return conflict(`Job ${jobId} has already ended: it is ${row.status}.`, code);
}
