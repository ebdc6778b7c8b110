/**
 * A job's log lines, metric points and checkpoints as the API pages them, for every job family (training and
 * distillation answer the same shapes; the worker reports both through the same protocol calls).
 */
import type { Request } from 'express';
import type { AppContext } from '../context.js';
import { isoRequired, queryInt, type Schemas } from '../http.js';
import type { JobRow } from '../queue/types.js';

const MAX_LOG_LINES = 1000;

/** `since=<seq>` lines after that seq (at most 1000), or `tail=N` the last N of them, oldest first. */
export async function logPage(ctx: AppContext, req: Request, job: JobRow): Promise<Schemas['LogPage']> {
  const since = queryInt(req, 'since', 0);
  const tail = req.query.tail === undefined ? undefined : queryInt(req, 'tail', MAX_LOG_LINES);
  const query = ctx.knex('job_logs').where('job_id', job.id).andWhere('seq', '>', since);
  const rows = tail
    ? (await query.orderBy('seq', 'desc').limit(tail)).reverse()
    : await query.orderBy('seq', 'asc').limit(MAX_LOG_LINES);
  return {
    job_id: job.id,
    latest_seq: job.log_seq,
    lines: rows.map((r) => ({ seq: r.seq, ts: isoRequired(r.ts), stream: r.stream, text: r.text })),
  };
}

/** Points with `step` above `since_step`, in step order (train before eval at one step), up to `limit`. */
export async function metricPage(ctx: AppContext, req: Request, job: JobRow): Promise<Schemas['MetricPage']> {
  const sinceStep = queryInt(req, 'since_step', -1);
  const limit = queryInt(req, 'limit', 1000);
  const rows = await ctx
    .knex('job_metrics')
    .where('job_id', job.id)
    .andWhere('step', '>', sinceStep)
    .orderBy([{ column: 'step' }, { column: 'phase', order: 'desc' }])
    .limit(limit);
  const latest = await ctx.knex('job_metrics').where('job_id', job.id).max({ step: 'step' }).first();
  const points = rows.map((r) => ({ ...r.point, ts: isoRequired(r.ts), step: r.step, phase: r.phase }));
  return {
    job_id: job.id,
    count: points.length,
    latest_step: latest?.step == null ? -1 : Number(latest.step),
    points,
  };
}

/** The job's durable checkpoints, oldest first. */
export async function checkpointList(ctx: AppContext, job: JobRow): Promise<Schemas['CheckpointList']> {
  const rows = await ctx
    .knex('files')
    .where({ owner_kind: 'checkpoint', owner_id: job.id })
    .orderBy([{ column: 'step' }, { column: 'created_at' }]);
  return {
    job_id: job.id,
    checkpoints: rows.map((r) => ({
      name: r.name,
      step: r.step ?? 0,
      size_bytes: Number(r.size_bytes),
      created_at: isoRequired(r.created_at),
    })),
  };
}
