import { createHash } from 'node:crypto';
import type { AppContext } from '../context.js';
import { badRequest } from '../errors.js';
import { APPLY_PROGRESS, fenceMissError, runningSql, TEACHER_TOKENS_COST } from './lease.js';
import { DISTILLATION_PHASES, isKnownPhase, TRAINING_PHASES } from './phases.js';
import type { ReportOutcome } from './types.js';

export interface WorkerEventInput {
  kind: string;
  ts?: string;
  payload?: Record<string, unknown>;
}

export interface EventReportInput {
  phase?: string;
  progress?: Record<string, unknown>;
  events?: WorkerEventInput[];
}

/**
 * What makes a worker event the same event when a batch is re-sent: its kind, timestamp and
 * payload (the attempt number is added in SQL). Two identical events without a timestamp count once.
 */
function eventKey(event: WorkerEventInput): string {
  const payloadHash = createHash('sha256')
    .update(JSON.stringify(event.payload ?? {}))
    .digest('hex')
    .slice(0, 16);
  return `${event.kind}:${event.ts ?? ''}:${payloadHash}`;
}

/** The batch's events, plus a `phase` event when the report moves the phase (once per attempt). */
function eventsToStore(report: EventReportInput) {
  const events = (report.events ?? []).map((event) => ({
    kind: event.kind,
    ts: event.ts ?? null,
    payload: event.payload ?? {},
    key: eventKey(event),
  }));
  if (report.phase) {
    events.push({ kind: 'phase', ts: null, payload: { phase: report.phase }, key: `phase:${report.phase}` });
  }
  return events.map((event, index) => ({ ...event, ord: index + 1 }));
}

/**
 * Applies a worker's phase and progress and appends its events, in one statement fenced by the
 * lease. Returns how many events were new.
 */
export async function reportEvents(
  ctx: AppContext,
  jobId: string,
  leaseToken: string,
  report: EventReportInput,
): Promise<ReportOutcome> {
  if (report.phase && !isKnownPhase(report.phase)) {
    throw badRequest(`Unknown phase "${report.phase}".`, 'phase');
  }
  const events = eventsToStore(report);
  const result = await ctx.knex.raw(
    `
    WITH lease AS (
      UPDATE jobs SET
        -- a phase of the other job family is ignored: the job's own enum must keep holding
        phase = CASE
          WHEN kind = 'training' AND :phase IN (SELECT jsonb_array_elements_text(:trainingPhases::jsonb)) THEN :phase
          WHEN kind = 'distillation' AND :phase IN (SELECT jsonb_array_elements_text(:distillationPhases::jsonb)) THEN :phase
          ELSE phase END,
        ${APPLY_PROGRESS},
        cost_accrued = cost_accrued + ${TEACHER_TOKENS_COST},
        -- seqs for the whole batch are reserved under the row lock; a repeat leaves a harmless gap
        event_seq = event_seq + :count,
        updated_at = now()
      -- fencing: a stale attempt changes nothing
      WHERE id = :jobId AND lease_token = :leaseToken AND ${runningSql()}
      RETURNING id, attempt, cancel_requested, event_seq - :count AS base_seq
    ), inserted AS (
      INSERT INTO job_events (job_id, seq, ts, kind, payload, dedupe_key)
      SELECT lease.id, lease.base_seq + e.ord, COALESCE(e.ts, now()), e.kind, e.payload,
             lease.attempt || ':' || e.key
      FROM lease, jsonb_to_recordset(:events::jsonb)
        AS e(kind text, ts timestamptz, payload jsonb, key text, ord int)
      -- the same event re-sent by the same attempt is stored once (migration 012's partial index)
      ON CONFLICT (job_id, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
      RETURNING 1
    )
    SELECT (SELECT count(*) FROM lease)::int AS leased, (SELECT count(*) FROM inserted)::int AS accepted,
      -- every answer tells the worker about a cancel, so it stops within a flush, not a heartbeat
      COALESCE((SELECT bool_or(cancel_requested) FROM lease), false) AS cancel_requested`,
    {
      jobId,
      leaseToken,
      phase: report.phase ?? null,
      trainingPhases: JSON.stringify(TRAINING_PHASES),
      distillationPhases: JSON.stringify(DISTILLATION_PHASES),
      progress: JSON.stringify(report.progress ?? {}),
      count: events.length,
      events: JSON.stringify(events),
    },
  );
  const { leased, accepted, cancel_requested } = result.rows[0] as ReportOutcome & { leased: number };
  if (!leased) throw await fenceMissError(ctx.knex, jobId);
  return { accepted, cancel_requested };
}
