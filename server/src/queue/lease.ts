import type { Knex } from 'knex';
import type { AppContext } from '../context.js';
import { type ApiError, leaseLost, notFound } from '../errors.js';

export type Db = Knex | Knex.Transaction;

/**
 * The columns a job's new attempt sets: running, leased to `workerId` with `leaseToken` for
 * `leaseSeconds`, billed from now. Each argument is the SQL that gives the value (a knex binding
 * such as `:workerId`, or a prepared statement's `$2`). The claim and a gang's start share it. "Now"
 * is the statement's time, not the transaction's: a gang starts in the transaction of the join that
 * completes it, after a wait for the job's row.
 */
export const startAttempt = (sql: { leaseToken: string; workerId: string; leaseSeconds: string }) => `
  status = 'running',
  attempt = attempt + 1,
  lease_token = ${sql.leaseToken},
  lease_owner = ${sql.workerId},
  lease_expires_at = statement_timestamp() + make_interval(secs => ${sql.leaseSeconds}),
  started_at = COALESCE(started_at, statement_timestamp()),
  billed_until = statement_timestamp(),
  phase = CASE WHEN phase = 'queued' THEN 'initializing' ELSE phase END`;

/** startAttempt with the knex bindings `:leaseToken`, `:workerId`, `:leaseSeconds`. */
export const START_ATTEMPT = startAttempt({
  leaseToken: ':leaseToken',
  workerId: ':workerId',
  leaseSeconds: ':leaseSeconds',
});

/**
 * SQL: the job row `alias` is running, for statements that find a job by its id (a heartbeat, a
 * report, a transition). Written with `IS TRUE`, a form from which Postgres proves no partial index
 * of running jobs usable (jobs_running_leases, jobs_running_lease_token), so the job is read through
 * the primary key. As `status = 'running'`, Postgres took one of those instead when its statistics
 * were older than the running jobs (taken after a burst of jobs was enqueued, before they were
 * claimed): it believed the index empty and read every running job for each statement. That rests
 * on how Postgres 15 proves index predicates: test/queue-statistics.test.ts checks it (a completion
 * is kept off those indexes another way: complete.ts).
 */
export const runningSql = (alias = 'jobs') => `(${alias}.status = 'running') IS TRUE`;

/** The job a worker names does not exist at all: 404, not a fencing failure. */
export const jobNotFound = (jobId: string) => notFound('job', jobId, 'job_id', 'job_not_found');

/**
 * A fenced statement touched no row: either the job does not exist (404) or the caller's lease is
 * no longer the current one (409 lease_lost). Only called after the fact, to pick the answer.
 */
export async function fenceMissError(db: Db, jobId: string): Promise<ApiError> {
  const row = await db('jobs').where({ id: jobId }).first('id');
  return row ? leaseLost(jobId) : jobNotFound(jobId);
}

/** USD per second of worker time, the unit cost_accrued grows by. */
export const pricePerSecond = (ctx: Pick<AppContext, 'config'>) => ctx.config.pricePerGpuHour / 3600;

/**
 * SQL assignments that bill the worker time since the last bill and move the mark to now().
 * Needs the binding `:pricePerSecond`. Used by every fenced transition, so a job is billed for
 * exactly the time some worker held a live lease on it (a dead worker's silent tail is not billed).
 */
// A gang (num_nodes > 1) holds that many workers for the same time.
const workerTimeCost = (pricePerSecond: string) =>
  `GREATEST(0, EXTRACT(EPOCH FROM now() - COALESCE(billed_until, now()))) * ${pricePerSecond} * jobs.num_nodes`;
const WORKER_TIME_COST = workerTimeCost(':pricePerSecond');
/** BILL_WORKER_TIME with the price given as SQL (a prepared statement's `$n`). */
export const billWorkerTime = (pricePerSecond: string) =>
  `cost_accrued = cost_accrued + ${workerTimeCost(pricePerSecond)}, billed_until = now()`;
export const BILL_WORKER_TIME = billWorkerTime(':pricePerSecond');

/**
 * SQL expression: the cost of the teacher tokens a progress report (`:progress`) adds to the job's
 * `progress.teacher_tokens`, at the job's `config.teacher_usd_per_million_tokens` (0 for jobs
 * without a teacher). An attempt resumed from a checkpoint reports the checkpoint's lower count
 * first (nothing billed) and then bills the tokens it pays the teacher again.
 */
export const TEACHER_TOKENS_COST = `
  GREATEST(0, COALESCE((:progress::jsonb ->> 'teacher_tokens')::numeric, 0)
    - COALESCE((progress ->> 'teacher_tokens')::numeric, 0))
  * COALESCE((config ->> 'teacher_usd_per_million_tokens')::numeric, 0) / 1000000`;

/** BILL_WORKER_TIME plus the teacher tokens of the progress report it comes with. */
export const BILL_WORKER_TIME_AND_TEACHER = `
  cost_accrued = cost_accrued + ${WORKER_TIME_COST} + ${TEACHER_TOKENS_COST},
  billed_until = now()`;

/**
 * SQL assignments applying a progress report (`:progress`, a JSON object) to the job's columns.
 * Known counters land in their columns, everything else is merged into `progress`.
 */
export const APPLY_PROGRESS = `
  progress = progress || :progress::jsonb,
  current_step = COALESCE((:progress::jsonb ->> 'current_step')::numeric::int, current_step),
  total_steps = COALESCE((:progress::jsonb ->> 'total_steps')::numeric::int, total_steps),
  current_loss = COALESCE((:progress::jsonb ->> 'current_loss')::float8, current_loss),
  learning_rate = COALESCE((:progress::jsonb ->> 'learning_rate')::float8, learning_rate),
  metrics = metrics || jsonb_strip_nulls(jsonb_build_object('train_loss', :progress::jsonb -> 'current_loss'))`;
