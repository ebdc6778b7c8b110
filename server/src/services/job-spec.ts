/**
 * What a worker receives when it claims a job (docs/worker-protocol.md, "ClaimedJob"): the spec
 * for its type, the input files to download, and the checkpoint to resume from. Secrets join the
 * spec here and nowhere else.
 */
import type { AppContext } from '../context.js';
import type { Schemas } from '../http.js';
import { type PreparedStatement, runPrepared } from '../prepared.js';
import type { ClaimedJobRow, DataFileRow } from '../queue/types.js';
import { SecretsUnreadable } from '../secrets.js';

type JobInput = Schemas['ClaimedJob']['inputs'][number];
type InputRole = JobInput['role'];

interface FileRow {
  id: string;
  name: string;
  size_bytes: number | string;
  sha256: string;
  step?: number | null;
}

/** Owner kind of files the server prepared for one job (e.g. a distillation's prompts). */
export const JOB_INPUT = 'job_input';
/** Model kinds whose files are a LoRA adapter rather than full weights. */
const ADAPTER_MODEL_KINDS = new Set(['adapter', 'distilled']);

export const workerFileUrl = (fileId: string) => `/v1/workers/files/${fileId}`;

/**
 * A job's dataset or source model was deleted after the job was queued. Handing the job out without
 * that input would have the worker train on the wrong thing (or nothing): the claim fails the job.
 */
export class MissingJobInput extends Error {}

const inputOf = (role: InputRole, file: FileRow): JobInput => ({
  role,
  name: file.name,
  file_id: file.id,
  download_url: workerFileUrl(file.id),
  size_bytes: Number(file.size_bytes),
  sha256: file.sha256,
});

/** A job's output files that another job can load (GGUF exports are for serving, not training). */
export async function loadableOutputs(ctx: Pick<AppContext, 'knex'>, jobId: string): Promise<FileRow[]> {
  const rows = (await ctx
    .knex('files')
    .where({ owner_kind: 'job_output', owner_id: jobId })
    .orderBy('name')) as FileRow[];
  return rows.filter((f) => !f.name.endsWith('.gguf'));
}

/**
 * The data files of job row `job` (an alias in the statement around it): its dataset's, its eval
 * dataset's (`config.eval_dataset_id`) and the files the server prepared for it alone (a
 * distillation's `prompts.jsonl`), as DataFileRow. The claim statement reads them for the jobs it
 * leases (no second round trip); DATA_FILES for any other job. A dataset is found by its id, the
 * tenant compared as `(… = …) IS TRUE`, which no index matches: as a plain `=`, the claim's cached
 * plan could take the (tenant_id, created_at) index and read all of the tenant's datasets per job.
 */
export const dataFilesOf = (job: string) => `
    SELECT 'dataset' AS source, f.id, f.name, f.size_bytes, f.sha256
    FROM datasets d JOIN files f ON f.id = d.file_id
    WHERE d.id = ${job}.dataset_id AND (d.tenant_id = ${job}.tenant_id) IS TRUE
    UNION ALL
    SELECT 'eval_dataset', f.id, f.name, f.size_bytes, f.sha256
    FROM datasets d JOIN files f ON f.id = d.file_id
    WHERE d.id = ${job}.config->>'eval_dataset_id' AND (d.tenant_id = ${job}.tenant_id) IS TRUE
    UNION ALL
    SELECT '${JOB_INPUT}', f.id, f.name, f.size_bytes, f.sha256
    FROM files f WHERE f.owner_kind = '${JOB_INPUT}' AND f.owner_id = ${job}.id`;

const DATA_FILES: PreparedStatement = {
  name: 'job_data_files',
  text: `SELECT files.* FROM jobs, LATERAL (${dataFilesOf('jobs')}) AS files WHERE jobs.id = $1`,
};

/**
 * The job's data inputs: its dataset (not a distillation's: it makes its own), the dataset it
 * evaluates on (`config.eval_dataset_id`), and the files the server wrote for it alone (the file
 * name says the role). `MissingJobInput` when a dataset named was deleted.
 */
async function dataInputs(ctx: AppContext, job: ClaimedJobRow): Promise<JobInput[]> {
  const datasetId = job.dataset_id && job.type !== 'distill' ? job.dataset_id : null;
  const evalId = typeof job.config?.eval_dataset_id === 'string' ? job.config.eval_dataset_id : null;
  const rows = job.data_files ?? (await runPrepared<DataFileRow>(ctx.knex, DATA_FILES, [job.id]));
  const of = (source: DataFileRow['source']) => rows.filter((r) => r.source === source);
  const [dataset] = datasetId ? of('dataset') : [];
  const [evalSet] = evalId ? of('eval_dataset') : [];
  if (datasetId && !dataset) throw new MissingJobInput(`Its dataset ${datasetId} was deleted.`);
  if (evalId && !evalSet) throw new MissingJobInput(`Its eval dataset ${evalId} was deleted.`);
  const prepared = of(JOB_INPUT).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return [
    ...(dataset ? [inputOf('dataset', dataset)] : []),
    ...(evalSet ? [inputOf('eval_dataset', evalSet)] : []),
    ...prepared.map((file) => inputOf(file.name.replace(/\.[^.]*$/, '') as InputRole, file)),
  ];
}

/** A merge loads its parent's adapter; a job on one of the tenant's models loads that model's files. */
async function modelInputs(ctx: AppContext, job: ClaimedJobRow): Promise<JobInput[]> {
  if (job.type === 'merge' && job.parent_job_id) {
    return (await loadableOutputs(ctx, job.parent_job_id)).map((f) => inputOf('adapter', f));
  }
  if (!job.model_id) return [];
  const model = await ctx
    .knex('models')
    .where({ id: job.model_id, tenant_id: job.tenant_id })
    .first('job_id', 'kind');
  if (!model) throw new MissingJobInput(`Its source model ${job.model_id} was deleted.`);
  const role: InputRole = ADAPTER_MODEL_KINDS.has(model.kind) ? 'adapter' : 'model';
  return (await loadableOutputs(ctx, model.job_id)).map((f) => inputOf(role, f));
}

async function resumeFrom(
  ctx: AppContext,
  job: ClaimedJobRow,
): Promise<Schemas['ClaimedJob']['resume_from']> {
  if (!job.resume_checkpoint) return null;
  const file = (await ctx
    .knex('files')
    .where({ owner_kind: 'checkpoint', owner_id: job.id, name: job.resume_checkpoint })
    .first()) as FileRow | undefined;
  if (!file) return null;
  return { name: file.name, step: file.step ?? 0, download_url: workerFileUrl(file.id) };
}

const obj = (value: unknown): Record<string, unknown> =>
  value && typeof value === 'object' && !Array.isArray(value) ? (value as Record<string, unknown>) : {};

/** A distillation's spec: the public config reshaped as the worker's handler reads it. */
function distillSpec(
  config: Record<string, unknown>,
  secrets: Record<string, unknown>,
): Record<string, unknown> {
  const teacher = { ...obj(config.teacher) };
  if (typeof secrets.teacher_api_key === 'string') teacher.api_key = secrets.teacher_api_key;
  const student = obj(config.student);
  return {
    teacher,
    student,
    base_model: student,
    seed: config.seed ?? 42,
    output_name: config.output_name ?? null,
    num_prompts: config.num_prompts,
    n_samples: config.n_samples,
    training_steps: config.training_steps,
    bond_beta: config.bond_beta,
    bond_gamma: config.bond_gamma,
    temperature: config.temperature,
    max_new_tokens: config.max_new_tokens,
    learning_rate: config.learning_rate,
    lora_rank: config.lora_rank,
    export_gguf: config.export_gguf,
    quantization_types: config.quantization_types,
  };
}

/** The job's secrets in clear, for the claim answer; a job they no longer open for cannot run. */
function openSecrets(ctx: AppContext, job: ClaimedJobRow): Record<string, unknown> {
  try {
    return ctx.secretBox.open(job.id, job.secrets);
  } catch (err) {
    if (err instanceof SecretsUnreadable) throw new MissingJobInput(err.message);
    throw err;
  }
}

/** The spec for the job's type, with its secrets in clear. Training configs are stored in spec shape already. */
function specOf(job: ClaimedJobRow, secrets: Record<string, unknown>): Record<string, unknown> {
  if (job.type === 'distill') return distillSpec(job.config, secrets);
  if (job.type === 'prompt_optimize') {
    const teacher = { ...(job.config.teacher as Record<string, unknown>) };
    if (typeof secrets.teacher_api_key === 'string') teacher.api_key = secrets.teacher_api_key;
    return { ...job.config, teacher };
  }
  const spec: Record<string, unknown> = { ...job.config };
  if (typeof secrets.hf_token === 'string') spec.hf_token = secrets.hf_token;
  return spec;
}

/**
 * Every file a job's worker may download: its inputs and its own checkpoints. A job whose input has
 * gone has none (its claim fails it anyway).
 */
export async function filesOfJob(ctx: AppContext, job: ClaimedJobRow): Promise<Set<string>> {
  let inputs: JobInput[];
  try {
    inputs = await inputsOf(ctx, job);
  } catch (err) {
    if (err instanceof MissingJobInput) return new Set();
    throw err;
  }
  const checkpoints = await ctx
    .knex('files')
    .where({ owner_kind: 'checkpoint', owner_id: job.id })
    .pluck('id');
  return new Set([...inputs.map((input) => input.file_id), ...checkpoints]);
}

/** The files a job reads; `MissingJobInput` when one is gone. */
async function inputsOf(ctx: AppContext, job: ClaimedJobRow): Promise<JobInput[]> {
  const [data, models] = await Promise.all([dataInputs(ctx, job), modelInputs(ctx, job)]);
  return [...data, ...models];
}

/** The whole ClaimedJob for a job this worker just leased; `MissingJobInput` when an input is gone. */
export async function buildClaimedJob(ctx: AppContext, job: ClaimedJobRow): Promise<Schemas['ClaimedJob']> {
  const [inputs, resume] = await Promise.all([inputsOf(ctx, job), resumeFrom(ctx, job)]);
  return {
    job_id: job.id,
    kind: job.kind,
    type: job.type as Schemas['ClaimedJob']['type'],
    attempt: job.attempt,
    lease_token: job.lease_token!,
    lease_expires_at: new Date(job.lease_expires_at!).toISOString(),
    lease_seconds: ctx.config.leaseSeconds,
    log_seq: job.log_seq,
    spec: specOf(job, openSecrets(ctx, job)),
    inputs,
    resume_from: resume,
  };
}
