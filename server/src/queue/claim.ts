import type { AppContext } from '../context.js';
import { newSecret } from '../ids.js';
import { type GangAddress, type GangJoin, joinGang } from './gang.js';
import { START_ATTEMPT } from './lease.js';
import { waitForJobSignal } from './notify.js';
import type { JobRow } from './types.js';

export interface WorkerCapabilities {
  job_types: string[];
  /** Omitted: the worker takes any method. */
  methods?: string[];
  device: 'cpu' | 'cuda' | 'mlx';
  memory_gb?: number;
  gpu_name?: string;
}

export interface ClaimInput {
  workerId: string;
  capabilities: WorkerCapabilities;
  /** Given: the worker can join gangs (num_nodes > 1) and would host their rendezvous here. */
  gang?: GangAddress;
}

/** A claim's outcome: a leased job, or membership of a gang that is forming. */
export type ClaimOutcome = { job: JobRow; gang?: never } | { gang: GangJoin; job?: never };

/** Longest single sleep of a long-poll: jobs whose backoff ends wake nobody, so look again this often. */
const RECHECK_MS = 1000;

/** A worker counts as online when it claimed or heartbeat within this many seconds. */
export const WORKER_ONLINE_SECONDS = 60;

/** Records the worker and what it can do, for the status pages. */
async function touchWorker(ctx: AppContext, input: ClaimInput): Promise<void> {
  await ctx.knex.raw(
    `
    INSERT INTO workers (id, capabilities, last_seen_at)
    VALUES (:workerId, :capabilities::jsonb, now())
    ON CONFLICT (id) DO UPDATE
      SET capabilities = EXCLUDED.capabilities, last_seen_at = EXCLUDED.last_seen_at`,
    { workerId: input.workerId, capabilities: JSON.stringify(input.capabilities) },
  );
}

/**
 * Leases the best runnable job this worker can run, or returns null. One statement (one round
 * trip, its own transaction) picks the job, leases it, opens its attempt and records the `claimed`
 * event; `event_seq` moves in the same update, so the event's seq needs no second lock.
 * When the best job is a gang job (num_nodes > 1, offered only to workers that can join gangs), the
 * statement leases nothing and returns that job's row as it is (`pending`): the caller joins its gang.
 */
export async function claimNextJob(ctx: AppContext, input: ClaimInput): Promise<JobRow | null> {
  const { capabilities } = input;
  const result = await ctx.knex.raw(
    `
    WITH next AS (
      SELECT id, num_nodes FROM jobs
      WHERE status = 'pending'
        -- backoff and scheduling use the database clock, never the server's
        AND run_at <= now()
        AND type IN (SELECT jsonb_array_elements_text(:jobTypes::jsonb))
        -- a worker that lists no methods runs any; jobs without a method suit every worker
        AND (method IS NULL OR :anyMethod OR method IN (SELECT jsonb_array_elements_text(:methods::jsonb)))
        AND (required_device IS NULL OR required_device = :device)
        -- gangs: only for workers that can join one, and not one this worker is waiting in already
        AND (num_nodes = 1 OR (:gang AND NOT EXISTS (
          SELECT 1 FROM job_gang_members m
          WHERE m.job_id = jobs.id AND m.worker_id = :workerId AND m.rank IS NULL)))
      -- the order of the partial index jobs_runnable: read in order, no sort of every pending row
      ORDER BY priority DESC, run_at, created_at
      -- concurrent claimers skip rows another claim is taking instead of queueing behind it
      FOR UPDATE SKIP LOCKED
      LIMIT 1
    ),
    claimed AS (
      UPDATE jobs SET
        ${START_ATTEMPT},
        event_seq = event_seq + 1,
        updated_at = now()
      FROM next
      WHERE jobs.id = next.id AND next.num_nodes = 1
      RETURNING jobs.*
    ),
    attempt AS (
      INSERT INTO job_attempts (job_id, attempt, worker_id, lease_token)
      SELECT id, attempt, :workerId, lease_token FROM claimed
    ),
    event AS (
      INSERT INTO job_events (job_id, seq, ts, kind, payload)
      SELECT id, event_seq, now(), 'claimed',
             jsonb_build_object('attempt', attempt, 'worker_id', :workerId::text, 'resume_checkpoint', resume_checkpoint)
      FROM claimed
    )
    SELECT * FROM claimed
    UNION ALL
    SELECT jobs.* FROM jobs JOIN next ON jobs.id = next.id WHERE next.num_nodes > 1`,
    {
      jobTypes: JSON.stringify(capabilities.job_types),
      anyMethod: capabilities.methods === undefined,
      methods: JSON.stringify(capabilities.methods ?? []),
      device: capabilities.device,
      gang: input.gang !== undefined,
      leaseToken: newSecret('lease'),
      workerId: input.workerId,
      leaseSeconds: ctx.config.leaseSeconds,
    },
  );
  return (result.rows[0] as JobRow | undefined) ?? null;
}

/**
 * Long-poll: claims at once if it can, else sleeps until a job is signalled (or a recheck is due)
 * and tries again, until `waitSeconds` have passed, the caller went away, or the server stops.
 * A gang job the claim offers is joined (queue/gang.ts); one that is no longer joinable is skipped.
 */
export async function claimJobWithWait(
  ctx: AppContext,
  input: ClaimInput,
  waitSeconds: number,
  callerGone: AbortSignal,
): Promise<ClaimOutcome | null> {
  await touchWorker(ctx, input);
  const deadline = Date.now() + waitSeconds * 1000;
  for (;;) {
    // A worker that hung up must not be handed a job it will never run.
    if (callerGone.aborted) return null;
    const job = await claimNextJob(ctx, input);
    if (job && job.num_nodes === 1) return { job };
    if (job && input.gang) {
      const joined = await joinGang(ctx, job.id, input.workerId, input.gang);
      if (joined) return { gang: joined };
      continue; // started or cancelled meanwhile: look again at once
    }
    const left = deadline - Date.now();
    if (left <= 0 || ctx.shuttingDown.signal.aborted) return null;
    await waitForJobSignal(ctx, Math.min(left, RECHECK_MS));
  }
}
