import type { AppContext } from '../context.js';

/**
 * Run once when a server starts, before its sweeper: while no server was up, no worker could
 * heartbeat, so leases that lapsed meanwhile say nothing about the workers. Every running job gets a
 * full lease from now (and a `lease_extended` event), so live workers have time to heartbeat back and
 * keep their jobs; only a worker that stays silent for a whole lease after the start is rescued (and
 * that attempt counts). Returns how many leases were extended. With several servers on one database,
 * one server's restart only delays the rescue of a dead worker's job by one lease.
 */
export async function extendLeasesAfterStart(ctx: AppContext): Promise<number> {
  const result = await ctx.knex.raw(
    `
    WITH extended AS (
      UPDATE jobs SET
        lease_expires_at = GREATEST(lease_expires_at, now() + make_interval(secs => :leaseSeconds)),
        -- the event's seq, taken under the same row lock (as recordEvent does)
        event_seq = event_seq + 1,
        updated_at = now()
      WHERE status = 'running'
      RETURNING id, event_seq, attempt, lease_expires_at
    )
    INSERT INTO job_events (job_id, seq, ts, kind, payload)
    SELECT id, event_seq, now(), 'lease_extended',
      jsonb_build_object('reason', 'server_start', 'attempt', attempt, 'lease_expires_at', lease_expires_at)
    FROM extended
    RETURNING job_id`,
    { leaseSeconds: ctx.config.leaseSeconds },
  );
  return result.rows.length;
}
