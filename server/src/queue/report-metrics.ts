import type { AppContext } from '../context.js';
import { fenceMissError, runningSql } from './lease.js';
import type { ReportOutcome } from './types.js';

export interface MetricPointInput {
  step: number;
  phase: 'train' | 'eval';
  ts?: string;
  [field: string]: unknown;
}

/** The last reported losses, shown on the job as `metrics.train_loss` / `metrics.eval_loss`. */
function latestLosses(points: MetricPointInput[]): Record<string, number> {
  const latest: Record<string, number> = {};
  const byStep = [...points].sort((a, b) => a.step - b.step);
  for (const point of byStep) {
    if (typeof point.loss === 'number') latest.train_loss = point.loss;
    if (typeof point.eval_loss === 'number') latest.eval_loss = point.eval_loss;
  }
  return latest;
}

/**
 * Stores a batch of metric points of the current attempt; returns how many were new. Points are
 * keyed by (job, phase, step): a resumed attempt re-reporting a step keeps the first point.
 */
export async function reportMetrics(
  ctx: AppContext,
  jobId: string,
  leaseToken: string,
  points: MetricPointInput[],
): Promise<ReportOutcome> {
  const rows = points.map(({ step, phase, ts, ...point }) => ({ step, phase, ts: ts ?? null, point }));
  const result = await ctx.knex.raw(
    `
    WITH lease AS (
      UPDATE jobs SET metrics = metrics || :latest::jsonb, updated_at = now()
      -- fencing: a stale attempt's points are refused as a whole
      WHERE id = :jobId AND lease_token = :leaseToken AND ${runningSql()}
      RETURNING id, cancel_requested
    ), inserted AS (
      INSERT INTO job_metrics (job_id, phase, step, ts, point)
      SELECT lease.id, p.phase, p.step, COALESCE(p.ts, now()), p.point
      FROM lease, jsonb_to_recordset(:rows::jsonb) AS p(step int, phase text, ts timestamptz, point jsonb)
      ON CONFLICT (job_id, phase, step) DO NOTHING
      RETURNING 1
    )
    SELECT (SELECT count(*) FROM lease)::int AS leased, (SELECT count(*) FROM inserted)::int AS accepted,
      -- every answer tells the worker about a cancel, so it stops within a flush, not a heartbeat
      COALESCE((SELECT bool_or(cancel_requested) FROM lease), false) AS cancel_requested`,
    { jobId, leaseToken, latest: JSON.stringify(latestLosses(points)), rows: JSON.stringify(rows) },
  );
  const { leased, accepted, cancel_requested } = result.rows[0] as ReportOutcome & { leased: number };
  if (!leased) throw await fenceMissError(ctx.knex, jobId);
  return { accepted, cancel_requested };
}
