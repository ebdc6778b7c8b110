import type { AppContext } from '../context.js';
import { ApiError, conflict, leaseLost } from '../errors.js';
import { getOrCreate } from '../get-or-create.js';
import { type PreparedStatement, runPrepared } from '../prepared.js';
import { planJobOutputs } from '../services/registry.js';
import { Coalescer } from './coalesce.js';
import { billWorkerTime, type Db, fenceMissError, jobNotFound, pricePerSecond } from './lease.js';
import { leasedJobs } from './leased-jobs.js';
import { type JobRow, OUTPUT_SOURCE_COLUMNS, type OutputSourceRow } from './types.js';

/**
 * A terminal transition found no running row for this token. When the same attempt already made
 * the very transition (a retried request whose first answer was lost), it is answered as done;
 * otherwise the lease is gone (or the job never existed).
 */
export async function repeatOrFenceMiss(
  db: Db,
  jobId: string,
  leaseToken: string,
  endedAs: JobRow['status'][],
): Promise<JobRow> {
  const row = (await db('jobs').where({ id: jobId }).first()) as JobRow | undefined;
  if (row && row.lease_token === leaseToken && endedAs.includes(row.status)) return row;
  throw await fenceMissError(db, jobId);
}

/** Closes the attempt's row with how it ended. */
export async function endAttempt(
  db: Db,
  job: Pick<JobRow, 'id' | 'attempt'>,
  outcome: string,
  error: { code?: string | null; message?: string | null } = {},
): Promise<void> {
  await db.raw(
    `
    UPDATE job_attempts SET outcome = :outcome, error_code = :code, error_message = :message, ended_at = now()
    WHERE job_id = :jobId AND attempt = :attempt AND outcome = 'running'`,
    {
      jobId: job.id,
      attempt: job.attempt,
      outcome,
      code: error.code ?? null,
      message: error.message ?? null,
    },
  );
}

/** One completion a worker sends: the job, its attempt's lease token, its result. */
export interface Completion {
  jobId: string;
  leaseToken: string;
  result: Record<string, unknown>;
}

/** How one completion went: done (now, or by an earlier send of the same request), or why not. */
export type CompletionOutcome = { jobId: string; error?: never } | { jobId: string; error: ApiError };

/** The jobs being completed, as the decision of what they register needs them. */
const READ_FOR_COMPLETION: PreparedStatement = {
  name: 'tunery_complete_read',
  text: `SELECT ${OUTPUT_SOURCE_COLUMNS.join(', ')} FROM jobs WHERE id = ANY($1::text[])`,
};

/**
 * Completes every listed job whose lease token is still its current one (`$1`: one JSON object per
 * job, from completionInput), in one statement: registers its adapter (under its fallback name when
 * another adapter has the name) and its output model, or stores a benchmark's scores; then one
 * update of the job's row (completed, result, billing, registry ids, the event's seq), its attempt
 * closed and its `completed` event. Job rows are locked in id order, so two batches never deadlock
 * over jobs. (Over an adapter name that both register they can: Postgres then fails one statement,
 * and its completions go again alone, completeEach.) Answers the ids it completed; a job whose lease
 * moved on is left as it is.
 *
 * Rows of other tables are found by an id (the job's, the model's) and the tenant compared as
 * `(… = …) IS TRUE`, a form no index matches: as a plain `=`, every index that leads with the tenant
 * (models' list index, adapters' primary key) matched it too, and a plan made while the table was
 * small could read every row of the tenant for each job (013_output_lookups_by_job.ts).
 *
 * Each job is read by its id and lease token in a lateral subquery that locks it (Postgres never
 * turns one that locks into a join; with no status in it, no partial index of running jobs fits, so
 * it reads the primary key), and fenced by a single join condition, the lease token of a running
 * job. As a join with the running jobs, the statement was planned on statistics older than them
 * (taken before a burst of jobs was claimed) and read every running job, through a partial index it
 * thought empty, for each batch. The single condition keeps the estimate at one job per completion,
 * which the steps after it are planned on: Postgres cannot see into `$1` and takes it for a hundred
 * rows, and planned for a hundred, those steps read the attempts, adapters and models whole. A
 * completion sent again after its job ended locks that job's row until its statement ends.
 */
export const COMPLETE_JOBS: PreparedStatement = {
  name: 'tunery_complete_jobs',
  text: `
    WITH input AS (
      SELECT * FROM jsonb_to_recordset($1::jsonb) AS r(
        job_id text, lease_token text, result jsonb,
        adapter_name text, adapter_fallback text, adapter_model text, adapter_description text,
        adapter_training_config jsonb, adapter_metrics jsonb,
        new_model_id text, model_kind text, model_name text, model_params bigint, benchmark jsonb)
    ),
    fenced AS (
      SELECT job.id, job.tenant_id, job.base_model, job.source_model_id, job.current_loss, job.steps_done, input.*
      FROM (SELECT * FROM input ORDER BY job_id) AS input
      JOIN LATERAL (
        SELECT id, status, lease_token, tenant_id, base_model, model_id AS source_model_id,
               current_loss, GREATEST(current_step, COALESCE(total_steps, 0)) AS steps_done
        FROM jobs WHERE jobs.id = input.job_id AND jobs.lease_token = input.lease_token
        FOR UPDATE
      ) AS job
        -- fencing: only the current attempt of a running job may complete it (one condition: see above)
        ON CASE WHEN job.status = 'running' THEN job.lease_token END = input.lease_token
    ),
    old_adapter AS (
      SELECT a.job_id, a.name FROM adapters a JOIN fenced f ON a.job_id = f.id AND (a.tenant_id = f.tenant_id) IS TRUE
    ),
    -- what the result does not say of the run, its progress does (registry.ts reportedMetrics)
    measured AS (
      SELECT f.*, adapter_metrics || jsonb_build_object(
        'final_loss', COALESCE(adapter_metrics->'final_loss', to_jsonb(current_loss)),
        'training_steps', COALESCE(adapter_metrics->'training_steps', to_jsonb(steps_done))) AS metrics
      FROM fenced f WHERE adapter_name IS NOT NULL
    ),
    -- the requested name, unless the tenant has an adapter of that name (ON CONFLICT: also one that a
    -- concurrent completion is inserting, whose commit this waits for)
    adapter_named AS (
      INSERT INTO adapters (tenant_id, name, job_id, model_name, description, training_config, metrics)
      SELECT tenant_id, adapter_name, id, adapter_model, adapter_description, adapter_training_config, metrics
      FROM measured f
      WHERE NOT EXISTS (SELECT 1 FROM old_adapter o WHERE o.job_id = f.id)
      ON CONFLICT (tenant_id, name) DO NOTHING
      RETURNING job_id, name
    ),
    adapter_fallback AS (
      INSERT INTO adapters (tenant_id, name, job_id, model_name, description, training_config, metrics)
      SELECT tenant_id, adapter_fallback, id, adapter_model, adapter_description, adapter_training_config, metrics
      FROM measured f
      WHERE NOT EXISTS (SELECT 1 FROM old_adapter o WHERE o.job_id = f.id)
        AND NOT EXISTS (SELECT 1 FROM adapter_named n WHERE n.job_id = f.id)
      ON CONFLICT (tenant_id, name) DO NOTHING
      RETURNING job_id, name
    ),
    adapter AS (
      SELECT job_id, name FROM old_adapter
      UNION ALL SELECT job_id, name FROM adapter_named
      UNION ALL SELECT job_id, name FROM adapter_fallback
    ),
    -- a job that makes an adapter completes only with it (both names taken: it stays running)
    registrable AS (
      SELECT f.*, a.name AS registered_adapter FROM fenced f LEFT JOIN adapter a ON a.job_id = f.id
      WHERE f.adapter_name IS NULL OR a.name IS NOT NULL
    ),
    old_model AS (
      SELECT m.job_id, m.id FROM models m JOIN registrable r ON m.job_id = r.id AND (m.tenant_id = r.tenant_id) IS TRUE
    ),
    new_model AS (
      INSERT INTO models (id, tenant_id, job_id, name, kind, base_model, params)
      SELECT new_model_id, tenant_id, id, COALESCE(registered_adapter, model_name), model_kind, base_model, model_params
      FROM registrable r
      WHERE model_kind IS NOT NULL AND NOT EXISTS (SELECT 1 FROM old_model o WHERE o.job_id = r.id)
      RETURNING job_id, id
    ),
    model AS (SELECT job_id, id FROM old_model UNION ALL SELECT job_id, id FROM new_model),
    scored AS (
      UPDATE models SET benchmark = r.benchmark FROM registrable r
      WHERE r.benchmark IS NOT NULL AND models.id = r.source_model_id AND (models.tenant_id = r.tenant_id) IS TRUE
    ),
    done AS (
      UPDATE jobs SET
        status = 'completed',
        phase = 'done',
        results = r.result,
        ${billWorkerTime('$2::float8')},
        current_step = r.steps_done,
        lease_expires_at = NULL,
        -- a completed run's earlier failures are history (kept on the attempts)
        error_code = NULL,
        error_message = NULL,
        output_model_id = m.id,
        adapter_name = r.registered_adapter,
        event_seq = event_seq + 1,
        finished_at = now(),
        updated_at = now()
      FROM registrable r LEFT JOIN model m ON m.job_id = r.id
      WHERE jobs.id = r.id
      RETURNING jobs.id, jobs.attempt, jobs.event_seq, jobs.output_model_id, jobs.adapter_name
    ),
    ended AS (
      UPDATE job_attempts SET outcome = 'completed', error_code = NULL, error_message = NULL, ended_at = now()
      FROM done
      WHERE job_attempts.job_id = done.id AND job_attempts.attempt = done.attempt AND job_attempts.outcome = 'running'
    ),
    event AS (
      INSERT INTO job_events (job_id, seq, ts, kind, payload)
      SELECT id, event_seq, now(), 'completed',
             jsonb_build_object('attempt', attempt, 'output_model_id', output_model_id, 'adapter_name', adapter_name)
      FROM done
    )
    SELECT id FROM done`,
};

/** Where a job stands, to answer a completion that completed nothing. */
const READ_LEASE_STATE: PreparedStatement = {
  name: 'tunery_complete_lease_state',
  text: 'SELECT id, status, lease_token FROM jobs WHERE id = ANY($1::text[])',
};

type LeaseState = Pick<JobRow, 'id' | 'status' | 'lease_token'>;

/** One element of COMPLETE_JOBS's `$1`: the completion and what its job registers. */
function completionInput(job: OutputSourceRow, completion: Completion) {
  const plan = planJobOutputs(job, completion.result);
  return {
    job_id: job.id,
    lease_token: completion.leaseToken,
    result: completion.result,
    adapter_name: plan.adapter?.name ?? null,
    adapter_fallback: plan.adapter?.fallbackName ?? null,
    adapter_model: plan.adapter?.row.model_name ?? null,
    adapter_description: plan.adapter?.row.description ?? null,
    adapter_training_config: plan.adapter?.row.training_config ?? null,
    adapter_metrics: plan.adapter?.row.metrics ?? null,
    new_model_id: plan.model?.id ?? null,
    model_kind: plan.model?.kind ?? null,
    model_name: plan.model?.name ?? null,
    model_params: plan.model?.params ?? null,
    benchmark: plan.benchmark,
  };
}

/**
 * The answer to a completion that completed nothing. When the same attempt already completed the
 * job (a retried request whose first answer was lost), it is answered as done; otherwise the lease
 * is gone (409 lease_lost) or the job never existed (404).
 */
function missOutcome(completion: Completion, job: LeaseState | undefined): CompletionOutcome {
  const { jobId, leaseToken } = completion;
  if (job?.lease_token === leaseToken && job.status === 'completed') return { jobId };
  if (job?.lease_token === leaseToken && job.status === 'running') {
    // both adapter names taken (the second holds the job's id): the job stays running
    const error = conflict(
      `Job ${jobId}: its adapter's name and its job-suffixed form are both taken; it stays running.`,
    );
    return { jobId, error };
  }
  return { jobId, error: job ? leaseLost(jobId) : jobNotFound(jobId) };
}

/**
 * Completes the current attempts of the listed jobs, each fenced by its own lease token: each
 * becomes `completed` with its result, its adapter and output model are registered, and the
 * registry's ids are stored on it. One statement whatever the count when this process leased the
 * jobs; else a read first, to decide what each job registers; another only to explain completions
 * that completed nothing. Answers each completion's outcome, in order; a job listed twice is
 * completed once. One that fails on its own (completeEach) is answered as a 500 in the list, and
 * stays running; a list of one throws its failure instead.
 */
export async function completeJobs(ctx: AppContext, completions: Completion[]): Promise<CompletionOutcome[]> {
  const settled = await completeEach(ctx, completions);
  if (completions.length === 1 && settled[0]?.status === 'rejected') throw settled[0].reason;
  return settled.map((outcome, i) => {
    if (outcome.status === 'fulfilled') return outcome.value;
    const { jobId } = completions[i]!;
    ctx.logger.error({ err: outcome.reason, jobId }, 'a batched completion failed');
    const message = `Job ${jobId} could not be completed (it stays running); its result was not stored.`;
    return { jobId, error: new ApiError(500, 'internal_error', message) };
  });
}

/**
 * completeTogether, with each completion's outcome settled on its own: a result Postgres refuses (a
 * fraction where a count goes, a NUL in text) fails the shared statement for every completion, so
 * then each goes again alone, side by side, and only that one fails, with its own error; a resend
 * of the others is answered `completed`.
 */
async function completeEach(
  ctx: AppContext,
  completions: Completion[],
): Promise<PromiseSettledResult<CompletionOutcome>[]> {
  try {
    const outcomes = await completeTogether(ctx, completions);
    return outcomes.map((value) => ({ status: 'fulfilled', value }));
  } catch (err) {
    if (completions.length === 1) return [{ status: 'rejected', reason: err }];
    return Promise.allSettled(completions.map(async (c) => (await completeTogether(ctx, [c]))[0]!));
  }
}

async function completeTogether(ctx: AppContext, completions: Completion[]): Promise<CompletionOutcome[]> {
  const byId = await outputSources(ctx, completions);
  const inputs = new Map<string, ReturnType<typeof completionInput>>();
  for (const c of completions) {
    const job = byId.get(c.jobId);
    if (job?.status !== 'running' || job.lease_token !== c.leaseToken || inputs.has(c.jobId)) continue;
    inputs.set(c.jobId, completionInput(job, c));
  }
  const done = new Set<string>();
  if (inputs.size > 0) {
    const rows = await runPrepared<{ id: string }>(ctx.knex, COMPLETE_JOBS, [
      JSON.stringify([...inputs.values()]),
      pricePerSecond(ctx),
    ]);
    for (const row of rows) {
      done.add(row.id);
      leasedJobs.forget(ctx.knex, row.id);
    }
  }
  // Sent but not completed: the lease moved on (or the job was never this one's); look again.
  const raced = [...inputs.keys()].filter((id) => !done.has(id));
  const now = raced.length > 0 ? await runPrepared<LeaseState>(ctx.knex, READ_LEASE_STATE, [raced]) : [];
  const states = new Map<string, LeaseState>([...byId, ...now.map((row) => [row.id, row] as const)]);
  return completions.map((c) =>
    done.has(c.jobId) && inputs.get(c.jobId)?.lease_token === c.leaseToken
      ? { jobId: c.jobId }
      : missOutcome(c, states.get(c.jobId)),
  );
}

/**
 * The completed jobs as their plan reads them: kept from this process's claim when it holds the
 * lease being completed, else read (one statement for the rest). A job listed with two different
 * tokens is read: which of them is current, only the database knows.
 */
async function outputSources(
  ctx: AppContext,
  completions: Completion[],
): Promise<Map<string, OutputSourceRow>> {
  const byId = new Map<string, OutputSourceRow>();
  const unknown = new Set<string>();
  for (const c of completions) {
    const job = leasedJobs.get(ctx.knex, c.jobId, c.leaseToken);
    if (job) byId.set(c.jobId, job);
    else unknown.add(c.jobId);
  }
  if (unknown.size === 0) return byId;
  const read = await runPrepared<OutputSourceRow>(ctx.knex, READ_FOR_COMPLETION, [[...unknown]]);
  for (const job of read) byId.set(job.id, job);
  return byId;
}

/** The most completions one statement takes: the spec's limit for a batch (`completeJobs`). */
const MAX_COMPLETION_BATCH = 32;

/**
 * Completions of one job each share statements under load (coalesce.ts). Each gets what it would
 * have got alone (completeEach): one that fails fails with its own error (app.ts answers a value
 * Postgres refuses with 400, as for a completion that ran alone).
 */
const completionCoalescers = new WeakMap<
  AppContext['knex'],
  Coalescer<Completion, PromiseSettledResult<CompletionOutcome>>
>();
const completionCoalescer = (ctx: AppContext) =>
  getOrCreate(
    completionCoalescers,
    ctx.knex,
    () =>
      new Coalescer<Completion, PromiseSettledResult<CompletionOutcome>>({
        run: (completions) => completeEach(ctx, completions),
        key: () => 'completion',
        maxBatch: MAX_COMPLETION_BATCH,
      }),
  );

/** Completes one job's current attempt (completeJobs, maybe with others'); a fencing miss is thrown. */
export async function completeJob(
  ctx: AppContext,
  jobId: string,
  leaseToken: string,
  result: Record<string, unknown>,
): Promise<Pick<JobRow, 'id' | 'status' | 'run_at'>> {
  const settled = await completionCoalescer(ctx).submit({ jobId, leaseToken, result });
  if (settled.status === 'rejected') throw settled.reason;
  if (settled.value.error) throw settled.value.error;
  return { id: jobId, status: 'completed', run_at: new Date() };
}
