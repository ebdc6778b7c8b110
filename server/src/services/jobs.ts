/**
 * Jobs as the API shows them: loading a tenant's job, and turning a `jobs` row into a TrainingJob
 * or a DistillationJob. State changes live in src/queue/, one file per transition.
 */
import type { AppContext } from '../context.js';
import { notFound } from '../errors.js';
import { iso, isoRequired, type Schemas } from '../http.js';
import { type PreparedStatement, runPrepared } from '../prepared.js';
import { DISTILLATION_PHASES, TRAINING_PHASES } from '../queue/phases.js';
import type { JobKind, JobRow } from '../queue/types.js';

export type { JobKind, JobRow } from '../queue/types.js';

/** A job's event timeline after `seq` `since`, in order (training and distillation jobs alike). */
export async function jobEvents(
  ctx: Pick<AppContext, 'knex'>,
  jobId: string,
  since: number,
): Promise<Schemas['EventList']> {
  const rows = await ctx.knex('job_events').where('job_id', jobId).andWhere('seq', '>', since).orderBy('seq');
  return {
    job_id: jobId,
    events: rows.map((r) => ({ seq: r.seq, ts: isoRequired(r.ts), kind: r.kind, payload: r.payload })),
  };
}

/** The tenant's job of this kind, or `404 job_not_found` (another tenant's job does not exist for you). */
export async function getJobRow(
  ctx: Pick<AppContext, 'knex'>,
  tenantId: string,
  id: string,
  kind: JobKind,
): Promise<JobRow> {
  const row = (await ctx.knex('jobs').where({ id, tenant_id: tenantId, kind }).first()) as JobRow | undefined;
  if (!row) throw notFound('job', id, 'job_id', 'job_not_found');
  return row;
}

/** The columns a TrainingJob shows: serializeTrainingJob reads these and no others. */
const TRAINING_VIEW_COLUMNS = [
  'id',
  'tenant_id',
  'type',
  'method',
  'status',
  'phase',
  'name',
  'priority',
  'config',
  'base_model',
  'dataset_id',
  'parent_job_id',
  'metrics',
  'current_step',
  'total_steps',
  'current_loss',
  'learning_rate',
  'attempt',
  'retries',
  'cancel_requested',
  'last_checkpoint_step',
  'output_model_id',
  'adapter_name',
  'cost_accrued',
  'error_code',
  'error_message',
  'created_at',
  'updated_at',
  'started_at',
  'finished_at',
] as const satisfies readonly (keyof JobRow)[];

type Timestamp = 'created_at' | 'updated_at' | 'started_at' | 'finished_at';

/**
 * What a TrainingJob is made from: a `jobs` row, or just its TRAINING_VIEW_COLUMNS as JSON (where
 * timestamps are ISO text).
 */
export type TrainingJobView = Omit<Pick<JobRow, (typeof TRAINING_VIEW_COLUMNS)[number]>, Timestamp> & {
  [K in Timestamp]: JobRow[K] | string;
};

/**
 * The GET of one training job, the API's hottest read: prepared (planned once per connection), only
 * the columns the view shows (a `jobs` row has 46, some of them large JSON), as one JSON value:
 * node-postgres then sets up and runs one field's parser, not thirty (a tenth of the GET's CPU).
 * Found by its id; the tenant compared in a form no index matches, so the cached plan cannot take
 * the tenant's list index instead of the primary key (see complete.ts).
 */
const TRAINING_JOB_VIEW: PreparedStatement = {
  name: 'training_job_view',
  text: `SELECT row_to_json(job) AS job FROM (
    SELECT ${TRAINING_VIEW_COLUMNS.join(', ')} FROM jobs WHERE id = $1 AND (tenant_id = $2) IS TRUE AND kind = 'training'
  ) AS job`,
};

/** The tenant's training job as the API shows it, or `404 job_not_found` (as getJobRow). */
export async function getTrainingJobView(
  ctx: Pick<AppContext, 'knex'>,
  tenantId: string,
  id: string,
): Promise<TrainingJobView> {
  const [row] = await runPrepared<{ job: TrainingJobView }>(ctx.knex, TRAINING_JOB_VIEW, [id, tenantId]);
  if (!row) throw notFound('job', id, 'job_id', 'job_not_found');
  return row.job;
}

const money = (value: string | number) => Number(Number(value).toFixed(4));

const jobError = (row: Pick<JobRow, 'error_code' | 'error_message'>): Schemas['JobError'] =>
  row.error_code ? { code: row.error_code, message: row.error_message ?? '' } : null;

/** Percent done, from the step counters; 100 once completed. */
function percentDone(row: Pick<JobRow, 'status' | 'current_step' | 'total_steps'>): number {
  if (row.status === 'completed') return 100;
  if (!row.total_steps || row.total_steps <= 0) return 0;
  return Math.min(100, Math.round((row.current_step / row.total_steps) * 1000) / 10);
}

/** A value outside the spec's enum (the queue never stores one) is shown as a safe default. */
function oneOf<P extends string>(value: string, allowed: readonly P[], fallback: P): P {
  return (allowed as readonly string[]).includes(value) ? (value as P) : fallback;
}

const trainingTypes = ['finetune', 'train', 'contract', 'merge', 'benchmark', 'prompt_optimize'] as const;
const methods = ['lora', 'qlora', 'full'] as const;
const isMethod = (value: string | null): value is Schemas['TrainingMethod'] =>
  value !== null && (methods as readonly string[]).includes(value);

/** Where a job's adapter files are on the server host, once it produced one. */
function adapterPathOf(
  row: Pick<JobRow, 'id' | 'adapter_name'>,
  storage?: Pick<AppContext['storage'], 'shownPath'>,
): string | null {
  if (!row.adapter_name || !storage) return null;
  return storage.shownPath(`jobs/${row.id}/outputs`);
}

/**
 * A training job as the API shows it. `storage` (the server's) lets it show `adapter_path`;
 * callers without it get null there.
 */
export function serializeTrainingJob(
  row: TrainingJobView,
  storage?: Pick<AppContext['storage'], 'shownPath'>,
): Schemas['TrainingJob'] {
  const config = row.config ?? {};
  return {
    id: row.id,
    job_id: row.id,
    type: oneOf(row.type, trainingTypes, 'finetune'),
    method: isMethod(row.method) ? row.method : null,
    status: row.status,
    phase: oneOf(row.phase, TRAINING_PHASES, 'initializing'),
    tenant_id: row.tenant_id,
    run_name: typeof config.run_name === 'string' ? config.run_name : row.name,
    base_model: row.base_model,
    model_name: row.base_model,
    dataset_id: row.dataset_id,
    parent_job_id: row.parent_job_id,
    config,
    progress: percentDone(row),
    current_step: row.current_step,
    total_steps: row.total_steps,
    current_loss: row.current_loss,
    learning_rate: row.learning_rate,
    metrics: row.metrics ?? {},
    retries: row.retries,
    attempt: row.attempt,
    last_checkpoint_step: row.last_checkpoint_step,
    output_model_id: row.output_model_id,
    adapter_name: row.adapter_name,
    adapter_path: adapterPathOf(row, storage),
    cancel_requested: row.cancel_requested,
    cost_accrued: money(row.cost_accrued),
    priority: row.priority,
    error: jobError(row),
    error_message: row.error_message,
    created_at: isoRequired(row.created_at),
    updated_at: isoRequired(row.updated_at),
    started_at: iso(row.started_at),
    finished_at: iso(row.finished_at),
    completed_at: row.status === 'completed' ? iso(row.finished_at) : null,
  };
}

/** A distillation job as seed 000 shows it (secrets never leave the `secrets` column). */
export function serializeDistillationJob(row: JobRow): Schemas['DistillationJob'] {
  return {
    id: row.id,
    name: row.name ?? row.id,
    description: row.description,
    tenant_id: row.tenant_id,
    status: row.status,
    phase: oneOf(row.phase, DISTILLATION_PHASES, 'initializing'),
    config: row.config ?? {},
    progress: row.progress ?? {},
    results: row.results ?? {},
    cost_accrued: money(row.cost_accrued),
    cancel_requested: row.cancel_requested,
    retries: row.retries,
    error: jobError(row),
    created_at: isoRequired(row.created_at),
    updated_at: isoRequired(row.updated_at),
    started_at: iso(row.started_at),
    finished_at: iso(row.finished_at),
  };
}

/** The tenant's jobs of a kind, narrowed by the list filters given; for `listPage`. */
export function jobsOfKind(
  ctx: Pick<AppContext, 'knex'>,
  tenantId: string,
  kind: JobKind,
  filters: { status?: string; type?: string },
) {
  const query = ctx.knex('jobs').where({ tenant_id: tenantId, kind });
  if (filters.status) query.andWhere('status', filters.status);
  if (filters.type) query.andWhere('type', filters.type);
  return query;
}
