import type { AppContext } from '../context.js';
import { getOrCreate } from '../get-or-create.js';
import { newSecret } from '../ids.js';
import { type PreparedStatement, runPrepared } from '../prepared.js';
import { dataFilesOf } from '../services/job-spec.js';
import { type CallerGone, Coalescer } from './coalesce.js';
import { type GangAddress, type GangJoin, joinGang } from './gang.js';
import { startAttempt } from './lease.js';
import { leasedJobs } from './leased-jobs.js';
import { handOnWake, type Wake, waitForJobs } from './notify.js';
import { releaseJob } from './release.js';
import { SeenWorkers } from './seen-workers.js';
import { CLAIMED_COLUMNS, type ClaimedJobRow } from './types.js';

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

/** A claim's outcome: leased jobs (at least one, best first), or membership of a gang that is forming. */
export type ClaimOutcome = { jobs: ClaimedJobRow[]; gang?: never } | { gang: GangJoin; jobs?: never };

/** Longest single sleep of a long-poll: jobs whose backoff ends wake nobody, so look again this often. */
const RECHECK_MS = 1000;

/** A worker counts as online when it claimed or heartbeat within this many seconds. */
export const WORKER_ONLINE_SECONDS = 60;

/** Workers recorded by this process's claims (a busy worker's claims write at most every few seconds). */
const workersSeen = new SeenWorkers();

/** Records the worker and what it can do, for the status pages. */
async function touchWorker(ctx: AppContext, input: ClaimInput): Promise<void> {
  const capabilities = JSON.stringify(input.capabilities);
  if (!workersSeen.due(ctx.knex, input.workerId, capabilities)) return;
  await ctx.knex.raw(
    `
    INSERT INTO workers (id, capabilities, last_seen_at)
    VALUES (:workerId, :capabilities::jsonb, now())
    ON CONFLICT (id) DO UPDATE
      SET capabilities = EXCLUDED.capabilities, last_seen_at = EXCLUDED.last_seen_at`,
    { workerId: input.workerId, capabilities },
  );
  workersSeen.recorded(ctx.knex, input.workerId, capabilities);
}

/** The most jobs one claim may lease (the spec's `max_jobs` maximum). */
export const MAX_CLAIM_BATCH = 32;

/** The smallest `integer` (a job's priority): no bound. */
const INT4_MIN = -2_147_483_648;

/**
 * Up to `max` runnable jobs these capabilities can run, best first, leased in one statement: each
 * gets its attempt (worker `$5[n]` and lease token `$6[n]` for the n-th best: one worker's batch, or
 * the claims of several that share the statement), its attempt row and its `claimed` event; `event_seq`
 * moves in the same update, so the event's seq needs no second lock; each comes back with the data
 * files it reads (`data_files`), so the claim answer needs no second round trip. Gang jobs
 * (num_nodes > 1) are offered only by the statement for workers that can join gangs (`gang`), and
 * never leased here: when the best job is one, the statement leases nothing and returns that job's
 * row as it is (`pending`) for the caller to join its gang; a gang job further down ends the batch
 * before it, so no job jumps ahead.
 *
 * Jobs to lease are read `FOR UPDATE SKIP LOCKED`: concurrent claims skip the rows another claim is
 * taking instead of queueing behind it. The best gang job is read without a lock: the one a worker
 * should join is often locked just then by another worker joining it (joinGang), and skipping it
 * sent this worker to a lesser gang, so two gangs competing for the same workers could split them
 * again and again; joinGang waits for that lock instead.
 *
 * `max` is written into the text, one named statement per batch size: with `LIMIT $n` Postgres
 * plans the statement anew on every call (about 1 ms, more than running it), since a plan for an
 * unknown limit looks dear; with a constant one it settles on one plan per connection. Whether the
 * worker joins gangs is written in too, for the same reason: with it as a parameter, the generic
 * plan could not leave the gang test out and looked dearer than a plan made for the values, so
 * Postgres planned most claims anew (63% of them in a bench drain).
 */
const claimStatement = (max: number, gang: boolean): PreparedStatement => {
  // the jobs these capabilities can run now (backoff and scheduling use the database clock, never the
  // server's; a worker that lists no methods runs any; jobs without a method suit every worker)
  const runnable = `status = 'pending'
        AND run_at <= now()
        AND type = ANY($1::text[])
        AND (method IS NULL OR $2::boolean OR method = ANY($3::text[]))
        AND (required_device IS NULL OR required_device = $4::text)`;
  // the order of the partial indexes jobs_runnable and jobs_runnable_gangs: read in order, no sort
  const best = 'ORDER BY priority DESC, run_at, created_at';
  return {
    name: gang ? `tunery_claim_gang_jobs_${max}` : `tunery_claim_jobs_${max}`,
    text: `
    WITH ${
      gang
        ? `best_gang AS (
      SELECT id, priority, run_at, created_at FROM jobs
      WHERE ${runnable} AND num_nodes > 1
        -- a gang this worker is waiting in already is not offered again (a worker that can join
        -- gangs claims alone: no other claim shares its statement)
        AND NOT EXISTS (
          SELECT 1 FROM job_gang_members m
          WHERE m.job_id = jobs.id AND m.worker_id = ($5::text[])[1] AND m.rank IS NULL)
      ${best}
      LIMIT 1
    ),`
        : ''
    }
    next AS (
      SELECT id, priority, run_at, created_at FROM jobs
      WHERE ${runnable} AND num_nodes = 1
        ${
          gang
            ? `-- none of a lower priority than the best gang job is locked (the index scan stops there);
        -- of the same priority, some behind it may be, and are released at once, not leased
        AND priority >= COALESCE((SELECT priority FROM best_gang), ${INT4_MIN})`
            : ''
        }
      ${best}
      FOR UPDATE SKIP LOCKED
      LIMIT ${max}
    ),
    ${
      gang
        ? `-- the jobs ahead of the best gang job (on a tie, the gang job goes first)
    ahead AS (
      SELECT next.* FROM next LEFT JOIN best_gang g ON true
      WHERE g.id IS NULL OR next.priority > g.priority
        OR (next.priority = g.priority AND (next.run_at, next.created_at) < (g.run_at, g.created_at))
    ),`
        : 'ahead AS (SELECT * FROM next),'
    }
    leasable AS (SELECT id, row_number() OVER (${best}) AS rank FROM ahead),
    claimed AS (
      UPDATE jobs SET
        ${startAttempt({ leaseToken: '($6::text[])[leasable.rank]', workerId: '($5::text[])[leasable.rank]', leaseSeconds: '$7::float8' })},
        event_seq = event_seq + 1,
        updated_at = now()
      FROM leasable
      WHERE jobs.id = leasable.id
      RETURNING leasable.rank, jobs.event_seq, jobs.lease_owner, ${CLAIMED_COLUMNS.map((c) => `jobs.${c}`).join(', ')}
    ),
    attempt AS (
      INSERT INTO job_attempts (job_id, attempt, worker_id, lease_token)
      SELECT id, attempt, lease_owner, lease_token FROM claimed
    ),
    event AS (
      INSERT INTO job_events (job_id, seq, ts, kind, payload)
      SELECT id, event_seq, now(), 'claimed',
             jsonb_build_object('attempt', attempt, 'worker_id', lease_owner, 'resume_checkpoint', resume_checkpoint)
      FROM claimed
    )
    SELECT ${CLAIMED_COLUMNS.join(', ')}, data_files FROM (
      SELECT rank, ${CLAIMED_COLUMNS.join(', ')},
        (SELECT COALESCE(jsonb_agg(files), '[]') FROM (${dataFilesOf('claimed')}) AS files) AS data_files
      FROM claimed
      ${
        gang
          ? `-- the best gang job, when no job is ahead of it
      UNION ALL
      SELECT 0, ${CLAIMED_COLUMNS.map((c) => `jobs.${c}`).join(', ')}, NULL
      FROM jobs JOIN best_gang ON jobs.id = best_gang.id WHERE NOT EXISTS (SELECT 1 FROM leasable)`
          : ''
      }
    ) AS answer
    ORDER BY rank`,
  };
};

const statementsOfEachSize = (gang: boolean) =>
  Array.from({ length: MAX_CLAIM_BATCH }, (_, i) => claimStatement(i + 1, gang));

/**
 * The claim statements of each batch size (1 to MAX_CLAIM_BATCH), built once: for workers outside
 * gangs, and for workers that can join them.
 */
export const CLAIM_STATEMENTS = { solo: statementsOfEachSize(false), gang: statementsOfEachSize(true) };

/**
 * Leases up to `max` of the best runnable jobs this worker can run, best first (none: empty). When
 * the best job is a gang job the answer is that one job, not leased (`pending`): the caller joins its
 * gang. One statement, its own transaction; a claim of one job by a worker outside gangs may share
 * its statement with other workers' claims of the same capabilities (claimCoalescer).
 */
export async function claimJobs(
  ctx: AppContext,
  input: ClaimInput,
  max: number,
  callerGone?: CallerGone,
): Promise<ClaimedJobRow[]> {
  if (!CLAIM_STATEMENTS.solo[max - 1])
    throw new RangeError(`A claim takes 1 to ${MAX_CLAIM_BATCH} jobs, not ${max}.`);
  const alone = () => {
    const workerIds = Array.from({ length: max }, () => input.workerId);
    return leaseJobs(ctx, input, workerIds, newLeaseTokens(max));
  };
  const rows =
    max === 1 && input.gang === undefined
      ? await claimCoalescer(ctx).submit(input, callerGone)
      : await alone();
  ctx.metrics.claimAttempts.inc({ outcome: rows.length > 0 ? 'claimed' : 'empty' });
  return rows;
}

const newLeaseTokens = (count: number) => Array.from({ length: count }, () => newSecret('lease'));

/**
 * One claim statement for up to `workerIds.length` jobs with `input`'s capabilities (and gang, for
 * one worker's claim), the n-th best leased to the n-th worker with the n-th token. Answers the rows.
 */
async function leaseJobs(
  ctx: AppContext,
  input: ClaimInput,
  workerIds: string[],
  leaseTokens: string[],
): Promise<ClaimedJobRow[]> {
  const { capabilities } = input;
  const statements = input.gang === undefined ? CLAIM_STATEMENTS.solo : CLAIM_STATEMENTS.gang;
  const rows = await runPrepared<ClaimedJobRow>(ctx.knex, statements[workerIds.length - 1]!, [
    capabilities.job_types,
    capabilities.methods === undefined,
    capabilities.methods ?? [],
    capabilities.device,
    workerIds,
    leaseTokens,
    ctx.config.leaseSeconds,
  ]);
  // a gang job comes back pending, not leased
  leasedJobs.remember(
    ctx.knex,
    rows.filter((row) => row.status === 'running'),
  );
  return rows;
}

/**
 * Claims of one job by workers outside gangs, of the same job types, methods and device, share
 * statements under load (coalesce.ts): one statement leases the best jobs to the claims in order of
 * arrival, each its own token; a claim whose token leased nothing gets nothing. The coalescer is
 * kept per database handle, with the first context it served (one per server).
 */
const claimCoalescers = new WeakMap<AppContext['knex'], Coalescer<ClaimInput, ClaimedJobRow[]>>();
const claimCoalescer = (ctx: AppContext) =>
  getOrCreate(
    claimCoalescers,
    ctx.knex,
    () =>
      new Coalescer<ClaimInput, ClaimedJobRow[]>({
        run: async (inputs) => {
          const tokens = newLeaseTokens(inputs.length);
          const workerIds = inputs.map((input) => input.workerId);
          const rows = await leaseJobs(ctx, inputs[0]!, workerIds, tokens);
          return tokens.map((token) => rows.filter((row) => row.lease_token === token));
        },
        // what the statement filters on, as it reads it
        key: ({ capabilities: c }) =>
          JSON.stringify([
            [...c.job_types].sort(),
            c.methods === undefined,
            [...(c.methods ?? [])].sort(),
            c.device,
          ]),
        maxBatch: MAX_CLAIM_BATCH,
        // a worker that hung up while its claim waited is leased nothing
        gone: [],
      }),
  );

/** The best runnable job for this worker, leased (or a gang job's row, not leased); null when none. */
export async function claimNextJob(ctx: AppContext, input: ClaimInput): Promise<ClaimedJobRow | null> {
  return (await claimJobs(ctx, input, 1))[0] ?? null;
}

/**
 * Releases jobs leased to a worker that will never hear of them (releaseJob: pending again at once,
 * the attempt given back, claims waiting in line woken). One that cannot be released is left to its
 * lease's expiry, and logged. Answers how many it released.
 */
export async function handBack(ctx: AppContext, jobs: ClaimedJobRow[]): Promise<number> {
  const leased = jobs.filter((job) => job.status === 'running');
  const released = await Promise.all(
    leased.map((job) =>
      releaseJob(ctx, job.id, job.lease_token!, 'server').then(
        () => true,
        (err: unknown) => {
          ctx.logger.error(
            { err, jobId: job.id },
            'a job leased to a worker that hung up could not be released',
          );
          return false;
        },
      ),
    ),
  );
  return released.filter(Boolean).length;
}

/**
 * Long-poll: claims (up to `max` jobs) at once if it can, else waits in line until a signal wakes it
 * (or a recheck is due) and tries again, until `waitSeconds` have passed, the caller went away, or
 * the server stops. A woken claim that gets nothing hands its wake on to the next claim in line (it
 * may be a worker that can run the job). A gang job the claim offers is joined (queue/gang.ts); one
 * that is no longer joinable is skipped. Jobs leased to a caller that went away while its claim ran
 * are released at once.
 */
export async function claimJobWithWait(
  ctx: AppContext,
  input: ClaimInput,
  waitSeconds: number,
  callerGone: CallerGone,
  max = 1,
  recheckMs = RECHECK_MS,
): Promise<ClaimOutcome | null> {
  await touchWorker(ctx, input);
  const deadline = Date.now() + waitSeconds * 1000;
  let wake: Wake | null = null;
  for (;;) {
    // A worker that hung up must not be handed a job it will never run.
    if (callerGone.aborted) {
      handOnWake(ctx, wake);
      return null;
    }
    const jobs = await claimJobs(ctx, input, max, callerGone);
    // It hung up while its claim ran: what it leased goes back to the queue now, not at lease expiry.
    if (callerGone.aborted) {
      // a released job wakes the next claim in line itself
      if ((await handBack(ctx, jobs)) === 0) handOnWake(ctx, wake);
      return null;
    }
    const best = jobs[0];
    if (best && best.num_nodes === 1) return { jobs };
    if (best && input.gang) {
      // the join may wait for the job's row (another worker joining it), or fail after that wait
      const joined = await joinGang(ctx, best.id, input.workerId, input.gang).catch((err: unknown) => {
        handOnWake(ctx, wake);
        throw err;
      });
      if (joined) return { gang: joined };
      continue; // started or cancelled meanwhile: look again at once
    }
    handOnWake(ctx, wake);
    const left = deadline - Date.now();
    if (left <= 0 || ctx.shuttingDown.signal.aborted) return null;
    wake = await waitForJobs(ctx, Math.min(left, recheckMs));
  }
}
