import type { AppContext } from '../context.js';
import { fenceMissError, runningSql } from './lease.js';
import type { ReportOutcome } from './types.js';

export interface LogLineInput {
  seq: number;
  ts?: string;
  stream?: 'stdout' | 'stderr';
  text: string;
}

/**
 * Stores a batch of log lines of the current attempt; returns how many were new. Lines are keyed
 * by (job, seq), so a batch re-sent after a timeout stores nothing twice.
 */
export async function reportLogs(
  ctx: AppContext,
  jobId: string,
  leaseToken: string,
  lines: LogLineInput[],
): Promise<ReportOutcome> {
  const rows = lines.map((l) => ({
    seq: l.seq,
    ts: l.ts ?? null,
    stream: l.stream ?? 'stdout',
    line: l.text,
  }));
  const maxSeq = Math.max(0, ...lines.map((l) => l.seq));
  const result = await ctx.knex.raw(
    `
    WITH lease AS (
      UPDATE jobs SET
        -- the next attempt continues numbering after the highest seq ever stored
        log_seq = GREATEST(log_seq, :maxSeq),
        updated_at = now()
      -- fencing: a stale attempt's lines are refused as a whole
      WHERE id = :jobId AND lease_token = :leaseToken AND ${runningSql()}
      RETURNING id, cancel_requested
    ), inserted AS (
      INSERT INTO job_logs (job_id, seq, ts, stream, text)
      SELECT lease.id, l.seq, COALESCE(l.ts, now()), l.stream, l.line
      FROM lease, jsonb_to_recordset(:rows::jsonb) AS l(seq int, ts timestamptz, stream text, line text)
      -- a re-sent line is already there
      ON CONFLICT (job_id, seq) DO NOTHING
      RETURNING 1
    )
    SELECT (SELECT count(*) FROM lease)::int AS leased, (SELECT count(*) FROM inserted)::int AS accepted,
      -- every answer tells the worker about a cancel, so it stops within a flush, not a heartbeat
      COALESCE((SELECT bool_or(cancel_requested) FROM lease), false) AS cancel_requested`,
    { jobId, leaseToken, maxSeq, rows: JSON.stringify(rows) },
  );
  const { leased, accepted, cancel_requested } = result.rows[0] as ReportOutcome & { leased: number };
  if (!leased) throw await fenceMissError(ctx.knex, jobId);
  return { accepted, cancel_requested };
}
