/**
 * What a completed job leaves behind: adapters and output models, registered from its result and
 * its uploaded output files. Adapters and models own no bytes of their own: their files are the
 * job's output files (`files` rows with owner_kind 'job_output', owner_id = job id).
 */
import { posix } from 'node:path';
import type { Knex } from 'knex';
import type { AppContext } from '../context.js';
import type { Schemas } from '../http.js';
import { newId } from '../ids.js';
import type { OutputSourceRow } from '../queue/types.js';

type ModelKind = Schemas['Model']['kind'];

/** One row of `adapters`. */
export interface AdapterRow {
  tenant_id: string;
  name: string;
  job_id: string | null;
  model_name: string;
  description: string | null;
  training_config: Record<string, unknown>;
  metrics: Record<string, unknown>;
  created_at: Date;
}

/** One row of `models` (params normalized to a number). */
export interface ModelRow {
  id: string;
  tenant_id: string;
  job_id: string;
  name: string;
  kind: ModelKind;
  base_model: string | null;
  params: number | null;
  provider_model: string | null;
  ollama_name: string | null;
  imported_at: Date | null;
  benchmark: Record<string, unknown> | null;
  created_at: Date;
}

/** One row of `files`. */
export interface FileRow {
  id: string;
  tenant_id: string;
  owner_kind: string;
  owner_id: string;
  name: string;
  rel_path: string;
  size_bytes: number;
  sha256: string;
  step: number | null;
  created_at: Date;
}

/**
 * Benchmark scores as the API shows them: numbers only. A score the worker computed as NaN arrives
 * as JSON null, which the spec (`additionalProperties: {type: number}`) refuses, so the response
 * would fail validation (500): such a score is left out instead.
 */
export function finiteScores(value: unknown): Record<string, number> | null {
  if (!value || typeof value !== 'object' || Array.isArray(value)) return null;
  return Object.fromEntries(
    Object.entries(value).filter(
      (entry): entry is [string, number] => typeof entry[1] === 'number' && Number.isFinite(entry[1]),
    ),
  );
}

export const toModelRow = (row: Record<string, unknown>): ModelRow => ({
  ...(row as unknown as ModelRow),
  params: row.params == null ? null : Number(row.params),
});

const toFileRow = (row: Record<string, unknown>): FileRow => ({
  ...(row as unknown as FileRow),
  size_bytes: Number(row.size_bytes),
});

const obj = (value: unknown): Record<string, unknown> | null =>
  value && typeof value === 'object' && !Array.isArray(value) ? (value as Record<string, unknown>) : null;
const num = (value: unknown): number | null =>
  typeof value === 'number' && Number.isFinite(value) ? value : null;
const str = (value: unknown): string | null => (typeof value === 'string' && value ? value : null);

/** Which model kind a completed job makes, and whether it also makes an adapter. */
function outputsOf(job: OutputSourceRow): { adapter: boolean; model: ModelKind | null } {
  switch (job.type) {
    case 'distill':
      return { adapter: true, model: 'distilled' };
    case 'finetune':
      return job.method === 'full' ? { adapter: false, model: 'full' } : { adapter: true, model: 'adapter' };
    case 'merge':
      return { adapter: false, model: 'merged' };
    case 'train':
      return { adapter: false, model: 'grown' };
    case 'contract':
      return { adapter: false, model: 'contracted' };
    default:
      return { adapter: false, model: null };
  }
}

/** A name usable in paths: the last segment of the base model, lower-cased, plain characters only. */
function slug(value: string | null): string {
  const last = (value ?? 'model').split('/').filter(Boolean).pop() ?? 'model';
  const clean = last
    .toLowerCase()
    .replace(/[^a-z0-9._-]+/g, '-')
    .replace(/^[^a-z0-9]+/, '')
    .slice(0, 100);
  return clean || 'model';
}

/** The job's id without its prefix, last 8 characters: enough to tell a tenant's outputs apart. */
const shortId = (jobId: string) => jobId.replace(/^[a-z]+_/, '').slice(-8);

/** The name the user asked for (`output_name`, top-level or in `hyperparams`), else what the worker reported. */
function requestedName(job: OutputSourceRow, result: Record<string, unknown>): string | null {
  const config = job.config ?? {};
  return (
    str(config.output_name) ??
    str(obj(config.hyperparams)?.output_name) ??
    str(obj(result.adapter)?.name) ??
    str(obj(result.model)?.name)
  );
}

/** The LoRA and training settings an adapter was trained with, flat as seed 003 shows them. */
function trainingConfigOf(job: OutputSourceRow): Record<string, unknown> {
  const config = job.config ?? {};
  // The worker's spec says `alpha` / `dropout`; adapters show peft's `lora_alpha` / `lora_dropout`.
  const specLora = obj(config.lora);
  const lora =
    obj(config.lora_config) ??
    (specLora &&
      Object.fromEntries(
        Object.entries(specLora).map(([k, v]) => [k === 'alpha' || k === 'dropout' ? `lora_${k}` : k, v]),
      )) ??
    {};
  const training = obj(config.training_config) ?? obj(config.training) ?? {};
  if (Object.keys(lora).length === 0 && Object.keys(training).length === 0) return { ...config };
  return { method: job.method, ...lora, ...training };
}

/**
 * An adapter's metrics as the worker's result reports them. `final_loss` and `training_steps` are
 * left out when it does not say: the completing statement then takes them from the job's progress
 * (queue/complete.ts), which only the database holds as it is at completion.
 */
function reportedMetrics(result: Record<string, unknown>): Record<string, unknown> {
  const seconds = num(result.train_seconds) ?? num(result.gpu_seconds);
  const finalLoss = num(result.loss_final) ?? num(result.final_loss);
  const steps = num(result.steps) ?? num(result.training_steps);
  const evalLoss = num(result.eval_loss_final);
  return {
    ...(finalLoss != null && { final_loss: finalLoss }),
    ...(steps != null && { training_steps: steps }),
    training_time_minutes: seconds == null ? null : Number((seconds / 60).toFixed(2)),
    ...(evalLoss != null && { eval_loss: evalLoss }),
  };
}

/**
 * What completing `job` with `result` registers, decided before the completing statement runs
 * (queue/complete.ts registers it in that same statement): the adapter's row under `name`, or under
 * `fallbackName` when the tenant has an adapter of that name; the output model; a benchmark's scores.
 * `job` holds only columns that stay as they are while it runs (OUTPUT_SOURCE_COLUMNS), so its
 * claim's row serves; what depends on its progress the statement adds (reportedMetrics).
 */
export interface OutputPlan {
  adapter: { name: string; fallbackName: string; row: AdapterInsert } | null;
  model: { id: string; kind: ModelKind; name: string; params: number | null } | null;
  /** A benchmark's scores, stored on the job's model (`job.model_id`). */
  benchmark: Record<string, unknown> | null;
}

export interface AdapterInsert {
  model_name: string;
  description: string | null;
  training_config: Record<string, unknown>;
  metrics: Record<string, unknown>;
}

export function planJobOutputs(job: OutputSourceRow, result: Record<string, unknown>): OutputPlan {
  if (job.type === 'benchmark') {
    const benchmark = job.model_id
      ? {
          scores: obj(result.scores) ?? {},
          job_id: job.id,
          dataset_id: job.dataset_id,
          completed_at: new Date().toISOString(),
        }
      : null;
    return { adapter: null, model: null, benchmark };
  }
  const outputs = outputsOf(job);
  if (!outputs.model) return { adapter: null, model: null, benchmark: null };
  const name = requestedName(job, result) ?? `${slug(job.base_model)}-${shortId(job.id)}`;
  const adapter = outputs.adapter
    ? {
        name,
        fallbackName: `${name.slice(0, 119)}-${shortId(job.id)}`,
        row: {
          model_name: job.base_model ?? 'unknown',
          description: job.description,
          training_config: trainingConfigOf(job),
          metrics: reportedMetrics(result),
        },
      }
    : null;
  const params = num(result.params_after) ?? num(result.params_before) ?? null;
  return { adapter, model: { id: newId('model'), kind: outputs.model, name, params }, benchmark: null };
}

// ------------------------------------------------------------------ reading outputs

/** The output files of jobs, by job id. */
export async function jobOutputFiles(
  db: Knex | Knex.Transaction,
  tenantId: string,
  jobIds: string[],
): Promise<Map<string, FileRow[]>> {
  const byJob = new Map<string, FileRow[]>(jobIds.map((id) => [id, []]));
  if (jobIds.length === 0) return byJob;
  const rows = await db('files')
    .where({ tenant_id: tenantId, owner_kind: 'job_output' })
    .whereIn('owner_id', jobIds)
    .orderBy('name');
  for (const row of rows) byJob.get(row.owner_id as string)?.push(toFileRow(row));
  return byJob;
}

/** The kind of each job (training or distillation), which decides its download URLs. */
export async function jobKinds(db: Knex | Knex.Transaction, jobIds: string[]): Promise<Map<string, string>> {
  if (jobIds.length === 0) return new Map();
  const rows = await db('jobs').whereIn('id', jobIds).select('id', 'kind');
  return new Map(rows.map((r) => [r.id as string, r.kind as string]));
}

const sizeMb = (bytes: number) => Number((bytes / 1e6).toFixed(2));

/** An output file as the API shows it, with the URL that downloads it with the same key. */
export function outputFileView(
  ctx: Pick<AppContext, 'storage'>,
  file: FileRow,
  jobKind: string | undefined,
): Schemas['OutputFile'] {
  const downloadUrl =
    jobKind === 'distillation'
      ? `/v1/distillation/${file.owner_id}/artifacts/${encodeURIComponent(file.name)}`
      : `/v1/training/jobs/${file.owner_id}/output/${encodeURIComponent(file.name)}`;
  return {
    name: file.name,
    size_bytes: file.size_bytes,
    size_mb: sizeMb(file.size_bytes),
    sha256: file.sha256,
    download_url: downloadUrl,
    path: ctx.storage.shownPath(file.rel_path),
  };
}

/** The folder of a job's outputs, relative to the data directory (see LocalStorage.shownPath). */
export function outputDirectory(
  ctx: Pick<AppContext, 'storage'>,
  jobId: string | null,
  files: FileRow[],
): string {
  const first = files[0];
  if (first) return posix.dirname(ctx.storage.shownPath(first.rel_path));
  return ctx.storage.shownPath(jobId ? `jobs/${jobId}/outputs` : '');
}

export const totalSizeMb = (files: FileRow[]) => sizeMb(files.reduce((sum, f) => sum + f.size_bytes, 0));
