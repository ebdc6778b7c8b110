import type { Knex } from 'knex';

/**
 * Appends one event to a job's timeline. The seq comes from `jobs.event_seq` in the same
 * statement, so events of one job are totally ordered without a second round trip.
 */
export async function recordEvent(
  db: Knex | Knex.Transaction,
  jobId: string,
  kind: string,
  payload: Record<string, unknown> = {},
): Promise<void> {
  await db.raw(
    `
    WITH next AS (
      -- the row lock on jobs serialises seq allocation per job
      UPDATE jobs SET event_seq = event_seq + 1 WHERE id = :jobId RETURNING event_seq
    )
    INSERT INTO job_events (job_id, seq, ts, kind, payload)
    SELECT :jobId, next.event_seq, now(), :kind, :payload::jsonb FROM next`,
    { jobId, kind, payload: JSON.stringify(payload) },
  );
}
