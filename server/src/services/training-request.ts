/**
 * createTrainingJob's request, normalised into one job: which model, which data, which settings.
 * Settings come in layers, later wins: the template's, then the request's. A request may write a
 * setting as a flat seed-001 field, in `hyperparams` (seed 002) or in the nested `lora_config` /
 * `training_config` (seed 003); writing one twice with different values is refused.
 * The stored `config` is the worker's spec for the job's type (docs/worker-protocol.md), minus secrets.
 */
import { readFile, realpath } from 'node:fs/promises';
import { basename, resolve, sep } from 'node:path';
import type { AppContext } from '../context.js';
import { ApiError, badRequest, invalidConfig, notFound } from '../errors.js';
import type { BodyOf, Schemas } from '../http.js';
import { WORKER_ONLINE_SECONDS } from '../queue/claim.js';
import type { EnqueueInput } from '../queue/enqueue.js';
import type { JobRow } from '../queue/types.js';
import { builtinModelShape, checkModelSource, resolveBaseModel } from './catalog.js';
import {
  type DatasetRow,
  estimateTokens,
  getDataset,
  latestDataset,
  parseJsonl,
  toDatasetRow,
  validateRecords,
} from './datasets.js';
import { estimateJobCostUsd } from './estimate.js';
import { planPromptOptimizeJob } from './prompt-optimize-request.js';
import { getTemplateConfig } from './templates.js';

export type TrainingJobCreate = BodyOf<'createTrainingJob'>;
type TemplateConfig = Schemas['TemplateConfig'];
type Hyperparams = Schemas['Hyperparams'];
type JobType = Schemas['TrainingJobType'];

/** What `base_model` in a spec holds: `source` is null when the model comes as input files. */
export interface SpecModel {
  id: string | null;
  name: string;
  source: string | null;
}

/** The data a job trains on: an existing dataset, or records to store as a new one. */
export type DataPlan =
  | { kind: 'existing'; dataset: DatasetRow }
  | { kind: 'new'; name: string; records: object[]; source: 'upload' | 'inline'; param: string }
  | null;

export interface TrainingJobPlan {
  job: Omit<EnqueueInput, 'id' | 'tenantId' | 'datasetId'>;
  data: DataPlan;
  estimatedUsd: number;
}

/** LoRA settings as the worker reads them (spec names: `alpha`, `dropout`). */
const LORA_DEFAULTS = {
  r: 16,
  alpha: 32,
  dropout: 0.05,
  target_modules: 'all-linear' as string | string[],
  bias: 'none',
};

/** TrainingConfig defaults, as the spec documents them. */
export const TRAINING_DEFAULTS = {
  num_epochs: 3,
  max_steps: -1,
  batch_size: 4,
  gradient_accumulation_steps: 1,
  learning_rate: 2e-4,
  warmup_steps: 0,
  lr_scheduler: 'linear',
  weight_decay: 0,
  max_seq_length: 2048,
  logging_steps: 10,
  save_steps: 500,
  eval_steps: 0,
  eval_split: 0,
  use_gradient_checkpointing: false,
  bf16: true,
  seed: 42,
  train_on_inputs: false,
};
type TrainingSettings = typeof TRAINING_DEFAULTS;
type LoraSettings = typeof LORA_DEFAULTS;

/** Drops undefined values, so spreading a layer never erases a lower one. */
function defined<T extends Record<string, unknown>>(values: T): Partial<T> {
  return Object.fromEntries(Object.entries(values).filter(([, v]) => v !== undefined)) as Partial<T>;
}

/** A setting: `lora.r`, `training.max_steps`, … */
type SettingKey = `lora.${keyof LoraSettings}` | `training.${keyof TrainingSettings}`;

/** One form of writing settings: which field of its object holds which setting. */
type Spelling = ReadonlyArray<readonly [SettingKey, string]>;

/** The flat seed-001 fields of a request. */
const FLAT: Spelling = [
  ['lora.r', 'lora_rank'],
  ['lora.alpha', 'lora_alpha'],
  ...(
    [
      'num_epochs',
      'batch_size',
      'learning_rate',
      'max_steps',
      'max_seq_length',
      'eval_steps',
      'eval_split',
      'use_gradient_checkpointing',
    ] as const
  ).map((key) => [`training.${key}`, key] as const),
];
const HYPERPARAMS: Spelling = [
  ['lora.r', 'lora_rank'],
  ['training.max_steps', 'steps'],
  ['training.learning_rate', 'lr'],
  ['training.max_seq_length', 'seq_len'],
];
const LORA_CONFIG: Spelling = [
  ['lora.r', 'r'],
  ['lora.alpha', 'lora_alpha'],
  ['lora.dropout', 'lora_dropout'],
  ['lora.target_modules', 'target_modules'],
  ['lora.bias', 'bias'],
];

/** A setting as one place wrote it: `param` is the field's path in the request (or template). */
interface Setting {
  key: SettingKey;
  param: string;
  value: unknown;
}

/** The settings `source` spells one way (`prefix` names the object they sit in). */
function spelled(source: object | undefined, spelling: Spelling, prefix = ''): Setting[] {
  const values = (source ?? {}) as Record<string, unknown>;
  return spelling.flatMap(([key, field]) =>
    values[field] === undefined ? [] : [{ key, param: `${prefix}${field}`, value: values[field] }],
  );
}

/** Every setting a request or template writes, in the order its forms layer (later wins). */
function settingsOf(source: {
  hyperparams?: Hyperparams;
  lora_config?: Schemas['LoraConfig'];
  training_config?: Schemas['TrainingConfig'];
}): Setting[] {
  // every TrainingConfig field is a training setting of the same name
  const fields = Object.keys(source.training_config ?? {}) as (keyof TrainingSettings)[];
  const training: Spelling = fields.map((key) => [`training.${key}`, key] as const);
  return [
    ...spelled(source.hyperparams, HYPERPARAMS, 'hyperparams.'),
    ...spelled(source.lora_config, LORA_CONFIG, 'lora_config.'),
    ...spelled(source.training_config, training, 'training_config.'),
  ];
}

/** A template's settings: its one flat field (`eval_split`), then hyperparams and nested objects. */
function templateSettings(template: TemplateConfig): Setting[] {
  return [...spelled(template, [['training.eval_split', 'eval_split']]), ...settingsOf(template)];
}

/** The request's settings: flat fields, then hyperparams and nested objects. */
function requestSettings(body: TrainingJobCreate): Setting[] {
  return [...spelled(body, FLAT), ...settingsOf(body)];
}

/**
 * A request that writes one setting twice with different values (`max_steps: 10` and
 * `training_config.max_steps: 20`) would have one of them ignored: refused, naming both.
 */
function refuseConflictingSettings(settings: Setting[]): void {
  const first = new Map<SettingKey, Setting>();
  for (const setting of settings) {
    const earlier = first.get(setting.key);
    if (!earlier) first.set(setting.key, setting);
    else if (JSON.stringify(earlier.value) !== JSON.stringify(setting.value)) {
      throw invalidConfig(
        `${earlier.param} and ${setting.param} set the same setting to different values (${JSON.stringify(earlier.value)} and ${JSON.stringify(setting.value)}): keep one.`,
        setting.param,
      );
    }
  }
}

/** Template first, then the request; the request's own forms must agree with each other. */
function mergeSettings(template: TemplateConfig, body: TrainingJobCreate) {
  const fromRequest = requestSettings(body);
  refuseConflictingSettings(fromRequest);
  const lora: Record<string, unknown> = { ...LORA_DEFAULTS };
  const training: Record<string, unknown> = { ...TRAINING_DEFAULTS };
  for (const { key, value } of [...templateSettings(template), ...fromRequest]) {
    const [group, name] = key.split('.') as ['lora' | 'training', string];
    (group === 'lora' ? lora : training)[name] = value;
  }
  return { lora: lora as LoraSettings, training: training as TrainingSettings };
}

/** A full fine-tune trains every weight: LoRA settings, the request's or its template's, would be ignored. */
function refuseLoraSettings(body: TrainingJobCreate, template: TemplateConfig): void {
  const fromRequest = requestSettings(body).find((s) => s.key.startsWith('lora.'));
  const fromTemplate = templateSettings(template).find((s) => s.key.startsWith('lora.'));
  const given = fromRequest?.param ?? (fromTemplate && 'template');
  if (given) {
    throw invalidConfig(
      `method full trains every weight, so LoRA settings do not apply: leave ${given === 'template' ? "the template's LoRA presets" : given} out, or use method lora.`,
      given,
    );
  }
}

/**
 * A fine-tune from an adapter model trains over that adapter merged into its base, which a 4-bit
 * (QLoRA) base cannot take; its output stacks both adapters' factors, which a bias term has none of.
 */
function refuseUnstackableStart(method: string | null, lora: LoraSettings | undefined): void {
  if (method === 'qlora') {
    throw invalidConfig(
      'A QLoRA run cannot start from an adapter model: use method lora, or merge the adapter first.',
      'method',
    );
  }
  if (lora && lora.bias !== 'none') {
    throw invalidConfig(
      `A LoRA run that starts from an adapter model trains no bias terms (bias ${lora.bias}): leave bias out.`,
      'lora_config.bias',
    );
  }
}

/** Where the request set a training setting, for an error's `param` (the template's when not). */
function settingParam(body: TrainingJobCreate, key: keyof TrainingSettings): string {
  const set = requestSettings(body).filter((s) => s.key === `training.${key}`);
  return set.at(-1)?.param ?? 'template';
}

// ------------------------------------------------------------------ the model

/** A completed job whose outputs include a LoRA adapter (a merge can start from it). */
const makesAdapter = (job: JobRow) =>
  job.type === 'distill' || (job.type === 'finetune' && (job.method === 'lora' || job.method === 'qlora'));

const specModelOfJob = (job: JobRow): SpecModel => {
  const config = job.config ?? {};
  const model = (job.type === 'distill' ? config.student : config.base_model) as
    | Partial<SpecModel>
    | undefined;
  return {
    id: model?.id ?? null,
    name: model?.name ?? job.base_model ?? 'unknown',
    source: model?.source ?? job.base_model,
  };
};

/** The parent of a merge: the tenant's completed job that produced a LoRA adapter. */
export async function mergeParent(
  ctx: AppContext,
  tenantId: string,
  parentId: string | undefined,
): Promise<JobRow> {
  if (!parentId)
    throw invalidConfig('A merge needs parent_job_id: the LoRA job whose adapter to merge.', 'parent_job_id');
  const parent = (await ctx.knex('jobs').where({ id: parentId, tenant_id: tenantId }).first()) as
    | JobRow
    | undefined;
  if (!parent) throw notFound('job', parentId, 'parent_job_id', 'job_not_found');
  if (!makesAdapter(parent)) {
    throw invalidConfig(
      `Job ${parentId} is a ${parent.method ?? parent.type} job; only LoRA/QLoRA jobs have an adapter to merge.`,
      'parent_job_id',
    );
  }
  if (parent.status !== 'completed') {
    throw invalidConfig(
      `Job ${parentId} is ${parent.status}; a merge needs a completed job.`,
      'parent_job_id',
    );
  }
  return parent;
}

interface ResolvedModel {
  model: SpecModel;
  params: number | null;
  modelId: string | null;
  /** The longest sequence the model takes, when its catalog entry says (null: unknown). */
  contextLength?: number | null;
  /** An adapter model: its files come as the job's `adapter` input, over its base. */
  adapter?: boolean;
}

/** One of the tenant's output models; adapters bring their base model along. */
async function sourceModel(ctx: AppContext, tenantId: string, modelId: string): Promise<ResolvedModel> {
  const row = await ctx.knex('models').where({ id: modelId, tenant_id: tenantId }).first();
  if (!row) throw notFound('model', modelId, 'source_model_id');
  const params = row.params == null ? null : Number(row.params);
  if (row.kind === 'adapter' || row.kind === 'distilled') {
    // the adapter's files come as inputs; the worker loads its base from the catalog's source
    const base = await resolveBaseModel(ctx, tenantId, { base_model: row.base_model }).catch(() => null);
    const source = checkModelSource(ctx.config, base?.source ?? row.base_model, 'source_model_id');
    return {
      model: { id: base?.id ?? null, name: row.base_model, source },
      params,
      modelId,
      adapter: true,
    };
  }
  return { model: { id: null, name: row.name, source: null }, params, modelId };
}

async function resolveModel(
  ctx: AppContext,
  tenantId: string,
  type: JobType,
  body: TrainingJobCreate,
  template: TemplateConfig,
  hp: Hyperparams,
): Promise<ResolvedModel> {
  const sourceModelId = body.source_model_id ?? hp.source_model_id;
  if (sourceModelId) return sourceModel(ctx, tenantId, sourceModelId);
  const baseModel = body.base_model ?? body.model_name ?? template.base_model;
  if (type === 'contract' && !baseModel && !body.base_model_id) {
    throw invalidConfig(
      'A contract run needs a source model: source_model_id (or base_model).',
      'source_model_id',
    );
  }
  if (type === 'benchmark') throw invalidConfig('A benchmark needs source_model_id.', 'source_model_id');
  const base = await resolveBaseModel(ctx, tenantId, {
    base_model: baseModel,
    base_model_id: body.base_model_id,
  });
  return {
    model: { id: base.id, name: base.name, source: base.source },
    params: base.params,
    modelId: null,
    contextLength: base.contextLength,
  };
}

// ------------------------------------------------------------------ the data

/** A dataset file under `${dataDir}/datasets`; anything resolving outside it (`..`, symlinks) is refused. */
async function readDatasetFile(ctx: AppContext, relative: string): Promise<object[]> {
  const root = resolve(ctx.config.dataDir, 'datasets');
  const outside = (path: string, base: string) => !path.startsWith(base + sep);
  if (outside(resolve(root, relative), root)) {
    throw invalidConfig(
      'dataset_path must name a file inside the data directory\'s "datasets" folder.',
      'dataset_path',
    );
  }
  let text: string;
  try {
    const real = await realpath(resolve(root, relative));
    if (outside(real, await realpath(root))) throw new Error('leads outside the datasets folder');
    text = await readFile(real, 'utf8');
  } catch {
    throw invalidConfig(
      `No uploaded dataset and no file in the datasets folder is named "${relative}" (hub dataset ids are not fetched: upload it with POST /v1/datasets).`,
      'dataset_path',
    );
  }
  return parseJsonl(text, 'dataset_path');
}

/**
 * The tenant's dataset uploaded through the API (`POST /v1/datasets` or `/openai/v1/files`) whose
 * id or upload name is `path`, the newest when several share the name; null when none. Only the
 * caller's tenant is searched: another tenant's uploads do not exist for it.
 */
async function uploadedDataset(ctx: AppContext, tenantId: string, path: string): Promise<DatasetRow | null> {
  const row = await ctx
    .knex('datasets')
    .where({ tenant_id: tenantId, source: 'upload' })
    .andWhere((q) => q.where('id', path).orWhere('name', path))
    .orderBy([
      { column: 'created_at', order: 'desc' },
      { column: 'id', order: 'desc' },
    ])
    .first();
  return row ? toDatasetRow(row) : null;
}

const DATA_FIELDS = ['dataset_id', 'dataset_path', 'train_texts'] as const;

async function planData(
  ctx: AppContext,
  tenantId: string,
  type: JobType,
  body: TrainingJobCreate,
  runName: string | undefined,
): Promise<DataPlan> {
  const given = DATA_FIELDS.filter((field) => body[field] !== undefined);
  if (given.length > 1) throw invalidConfig(`Give only one of ${DATA_FIELDS.join(', ')}.`, given[1]!);
  if (given.length === 0) {
    // training trains on the newest dataset (seed 004); contract and merge need none
    if (type === 'finetune' || type === 'train') {
      return { kind: 'existing', dataset: await latestDataset(ctx, tenantId) };
    }
    // scores on whatever dataset happens to be newest would mean nothing
    if (type === 'benchmark') {
      throw invalidConfig(
        'A benchmark job needs data: dataset_id, dataset_path or train_texts.',
        'dataset_id',
      );
    }
    return null;
  }
  if (body.dataset_id) return { kind: 'existing', dataset: await getDataset(ctx, tenantId, body.dataset_id) };
  if (body.dataset_path) {
    // the caller's own upload comes first: it is what a client that uploaded a file names
    const uploaded = await uploadedDataset(ctx, tenantId, body.dataset_path);
    if (uploaded) return { kind: 'existing', dataset: uploaded };
    const records = await readDatasetFile(ctx, body.dataset_path);
    return {
      kind: 'new',
      name: basename(body.dataset_path),
      records,
      source: 'upload',
      param: 'dataset_path',
    };
  }
  const records = body.train_texts!.map((text) => ({ text }));
  return { kind: 'new', name: runName ?? 'inline texts', records, source: 'inline', param: 'train_texts' };
}

const dataStats = (data: DataPlan): { examples: number; tokens: number; format: string | null } => {
  if (!data) return { examples: 0, tokens: 0, format: null };
  if (data.kind === 'existing') {
    return {
      examples: data.dataset.num_examples,
      tokens: data.dataset.tokens_est,
      format: data.dataset.format,
    };
  }
  const bytes = data.records.reduce((sum, r) => sum + Buffer.byteLength(JSON.stringify(r)) + 1, 0);
  // the same check storeDataset makes later, early enough to name the format in the spec
  const { format } = validateRecords(data.records, data.param);
  return { examples: data.records.length, tokens: estimateTokens(bytes), format };
};

// ------------------------------------------------------------------ steps, cost, names

/** Mirrors the worker: the held-out split, then ceil(epochs × examples / examples per step). */
function finetuneTotalSteps(training: TrainingSettings, examples: number): number | null {
  if (training.max_steps > 0) return training.max_steps;
  if (examples === 0) return null;
  const held =
    training.eval_split > 0 && examples >= 2
      ? Math.min(examples - 1, Math.max(1, Math.floor(examples * training.eval_split)))
      : 0;
  const perStep = training.batch_size * training.gradient_accumulation_steps;
  return Math.max(1, Math.ceil((training.num_epochs * (examples - held)) / perStep));
}

/** `output_name`, else hyperparams', else the last segment of seed 003's `output_dir`. */
function outputNameOf(body: TrainingJobCreate, hp: Hyperparams): string | undefined {
  if (body.output_name) return body.output_name;
  if (hp.output_name) return hp.output_name;
  if (!body.output_dir) return undefined;
  const last = body.output_dir
    .split(/[\\/]/)
    .filter((s) => s && s !== '.' && s !== '..')
    .pop();
  if (!last || !/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(last)) {
    throw invalidConfig(
      'The last segment of output_dir must be a plain name (letters, digits, ".", "_", "-").',
      'output_dir',
    );
  }
  return last;
}

// ------------------------------------------------------------------ fields a type acts on

type BodyField = keyof TrainingJobCreate;
const MODEL_FIELDS: BodyField[] = ['base_model', 'model_name', 'base_model_id', 'source_model_id'];
const DATA: BodyField[] = [...DATA_FIELDS];
const OUTPUT: BodyField[] = ['output_name', 'output_dir'];

/** Fields every type acts on (`hyperparams` and `training_config` are checked key by key). */
const COMMON_FIELDS: BodyField[] = [
  'type',
  'idempotency_key',
  'template',
  'hyperparams',
  'training_config',
  'run_name',
  'wandb_project',
  'hf_token',
  'backend',
  'priority',
  'max_attempts',
];

/** The request fields each type acts on: any other is refused, never stored and ignored. */
const TYPE_FIELDS: Record<Exclude<JobType, 'prompt_optimize'>, BodyField[]> = {
  finetune: [
    ...MODEL_FIELDS,
    ...DATA,
    ...OUTPUT,
    'method',
    'eval_split',
    'eval_dataset_id',
    'lora_config',
    'num_epochs',
    'batch_size',
    'learning_rate',
    'max_steps',
    'lora_rank',
    'lora_alpha',
    'max_seq_length',
    'eval_steps',
    'use_gradient_checkpointing',
    'distributed',
    'num_nodes',
  ],
  train: [...MODEL_FIELDS, ...DATA, ...OUTPUT, 'eval_dataset_id'],
  contract: [...MODEL_FIELDS, ...DATA, ...OUTPUT],
  merge: [...OUTPUT, 'parent_job_id'],
  // a benchmark scores an existing output model and writes its scores onto it: no new model
  benchmark: ['source_model_id', ...DATA],
};

/** The `hyperparams` keys each type acts on (seed 002). */
const TYPE_HYPERPARAMS: Record<Exclude<JobType, 'prompt_optimize'>, (keyof Hyperparams)[]> = {
  finetune: ['lora_rank', 'steps', 'lr', 'seq_len', 'output_name', 'source_model_id'],
  train: [
    'turns',
    'cycles',
    'steps_per_cycle',
    'lr',
    'seq_len',
    'new_layers',
    'output_name',
    'source_model_id',
  ],
  contract: ['contraction_ratio', 'num_layers_to_contract', 'output_name', 'source_model_id'],
  merge: ['output_name'],
  benchmark: ['source_model_id'],
};

const METHOD_HINT: Record<string, string> = {
  train: 'grows the model',
  contract: 'removes layers',
  merge: "merges the parent job's adapter",
  benchmark: 'scores an output model',
};

/**
 * Refuses every field of the request that a job of `type` would not act on, naming it: a
 * `merge` given `lora_config`, a `contract` given `eval_split`, a `benchmark` given
 * `output_name`. Non-finetune types read only `seed` from `training_config`. Also refuses the
 * model or the output named twice (one of the two would be ignored). A finetune setting given in
 * several forms (flat, `hyperparams`, nested) is checked by mergeSettings: equal values only.
 */
function refuseFieldsTypeIgnores(type: JobType, body: TrainingJobCreate): void {
  if (type === 'prompt_optimize') return;
  const allowed = new Set<string>([...COMMON_FIELDS, ...TYPE_FIELDS[type]]);
  const what = METHOD_HINT[type] ?? 'fine-tunes';
  for (const [field, value] of Object.entries(body)) {
    if (value === undefined || allowed.has(field)) continue;
    throw invalidConfig(`A ${type} job does not use ${field} (it ${what}); leave it out.`, field);
  }
  const hpAllowed = new Set<string>(TYPE_HYPERPARAMS[type]);
  for (const [key, value] of Object.entries(body.hyperparams ?? {})) {
    if (value === undefined || hpAllowed.has(key)) continue;
    throw invalidConfig(
      `A ${type} job does not use hyperparams.${key}; it reads ${[...hpAllowed].join(', ')}.`,
      `hyperparams.${key}`,
    );
  }
  if (type !== 'finetune') {
    for (const [key, value] of Object.entries(body.training_config ?? {})) {
      // a merge draws no random numbers: it reads not even the seed
      if (value === undefined || (key === 'seed' && type !== 'merge')) continue;
      throw invalidConfig(
        type === 'merge'
          ? `A merge job trains nothing and reads nothing from training_config, not ${key}.`
          : `A ${type} job reads only seed from training_config, not ${key}.`,
        `training_config.${key}`,
      );
    }
  }
  const models = (
    [
      ['base_model', body.base_model],
      ['model_name', body.model_name],
      ['base_model_id', body.base_model_id],
      ['source_model_id', body.source_model_id],
      ['hyperparams.source_model_id', body.hyperparams?.source_model_id],
    ] as const
  ).filter(([, v]) => v !== undefined);
  if (models.length > 1) {
    throw invalidConfig(
      `Name the model once: ${models.map(([f]) => f).join(' and ')} were both given.`,
      models[1]![0],
    );
  }
  if (body.output_name !== undefined && body.hyperparams?.output_name !== undefined) {
    throw invalidConfig('Give output_name once: top-level or in hyperparams.', 'hyperparams.output_name');
  }
  if (body.output_dir !== undefined && (body.output_name ?? body.hyperparams?.output_name) !== undefined) {
    throw invalidConfig('output_dir names the output too; give it or output_name, not both.', 'output_dir');
  }
}

/**
 * A template's presets are held to the same rule as the request's own fields: a fine-tune
 * template (its `method`, `lora_config`, …) named on a `contract` job would be ignored, so refused.
 */
function refuseTemplatePresetsTypeIgnores(type: JobType, name: string, template: TemplateConfig): void {
  try {
    refuseFieldsTypeIgnores(type, template as TrainingJobCreate);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    throw invalidConfig(
      `Template "${name}" presets ${err.param}, which a ${type} job does not use: name a template made for ${type} jobs, or none.`,
      'template',
    );
  }
}

/**
 * A template's config as it is created: its presets must not contradict each other (`eval_split`
 * and `training_config.eval_split` with two values) nor preset what its type does not use (a
 * `contract` template with `lora_config`), so that every job naming it would not be refused.
 * Errors name the field under `config.`.
 */
export function checkTemplateConfig(config: TemplateConfig): void {
  try {
    refuseConflictingSettings(templateSettings(config));
    refuseFieldsTypeIgnores(config.type ?? 'finetune', config as TrainingJobCreate);
    if (config.method === 'full') refuseLoraSettings(config as TrainingJobCreate, {});
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    throw new ApiError(err.status, err.code, err.message, err.param ? `config.${err.param}` : 'config');
  }
}

/**
 * The device a job's `backend` pins. `mlx` runs only on a worker announcing that device, so a
 * request for it is refused while none is online rather than queued for a worker that never comes.
 */
async function requiredDeviceOf(
  ctx: AppContext,
  backend: TrainingJobCreate['backend'],
): Promise<'cpu' | 'cuda' | 'mlx' | null> {
  if (backend === 'cpu' || backend === 'cuda') return backend;
  if (backend !== 'mlx') return null;
  const online = await ctx.knex.raw(
    `SELECT 1 FROM workers
     WHERE capabilities->>'device' = 'mlx' AND last_seen_at > now() - make_interval(secs => ?)
     LIMIT 1`,
    [WORKER_ONLINE_SECONDS],
  );
  if (online.rows.length === 0) {
    throw badRequest('No online worker announces the mlx backend.', 'backend', 'backend_unavailable');
  }
  return 'mlx';
}

/**
 * `qlora` loads 4-bit weights with bitsandbytes, which only CUDA workers do: refused when the job's
 * `backend` pins another device, and (like `backend: mlx`) while no online CUDA worker that runs
 * finetune jobs with qlora is there to take it, rather than queued to fail or wait forever.
 */
async function checkMethodRunnable(
  ctx: AppContext,
  method: string | null,
  requiredDevice: string | null,
): Promise<void> {
  if (method !== 'qlora') return;
  if (requiredDevice && requiredDevice !== 'cuda') {
    throw invalidConfig(
      `method qlora needs a CUDA worker; backend ${requiredDevice} pins another device.`,
      'method',
    );
  }
  const online = await ctx.knex.raw(
    `SELECT 1 FROM workers
     WHERE capabilities->>'device' = 'cuda'
       AND capabilities->'job_types' @> '["finetune"]'::jsonb
       AND (capabilities->'methods' IS NULL OR capabilities->'methods' @> '["qlora"]'::jsonb)
       AND last_seen_at > now() - make_interval(secs => ?)
     LIMIT 1`,
    [WORKER_ONLINE_SECONDS],
  );
  if (online.rows.length === 0) {
    throw badRequest(
      'method qlora needs a CUDA worker, and no online worker with device cuda runs qlora fine-tunes; use method lora or start a GPU worker.',
      'method',
      'backend_unavailable',
    );
  }
}

/** Checks of a fine-tune's settings against its data that the worker would otherwise fail or skip later. */
function checkFinetuneSettings(body: TrainingJobCreate, training: TrainingSettings, examples: number): void {
  if (training.eval_split > 0 && examples < 2) {
    throw invalidConfig(
      `eval_split holds out part of the data for evaluation, which needs at least 2 examples; the dataset has ${examples}.`,
      settingParam(body, 'eval_split'),
    );
  }
  if (body.eval_dataset_id && training.eval_split > 0) {
    throw invalidConfig(
      'eval_dataset_id is evaluated on instead of a held-out split: give it or eval_split, not both.',
      'eval_dataset_id',
    );
  }
  if (training.eval_steps > 0 && training.eval_split === 0 && !body.eval_dataset_id) {
    throw invalidConfig(
      'eval_steps evaluates on held-out data, and neither eval_split nor eval_dataset_id gives any: set one or leave eval_steps out.',
      settingParam(body, 'eval_steps'),
    );
  }
}

/**
 * A max_seq_length the request wrote must fit the model's context when the catalog gives it (400);
 * a template's or the default one is lowered to it, so a short-context model needs no setting.
 */
function fitSeqLengthToModel(
  body: TrainingJobCreate,
  training: TrainingSettings,
  model: ResolvedModel,
): void {
  const limit = model.contextLength;
  if (!limit || training.max_seq_length <= limit) return;
  const param = settingParam(body, 'max_seq_length');
  if (param === 'template') {
    training.max_seq_length = limit;
    return;
  }
  throw invalidConfig(
    `max_seq_length ${training.max_seq_length} is longer than ${model.model.name} takes (${limit} tokens).`,
    param,
  );
}

/**
 * A contract run removes `max(1, round(contraction_ratio × num_layers_to_contract))` layers and keeps
 * at least one (the worker's rule): checked against the layer count when the catalog knows it.
 */
function checkContraction(config: Record<string, unknown>, model: SpecModel): void {
  const shape = builtinModelShape(model.source);
  if (!shape) return;
  const ratio = config.contraction_ratio as number;
  const count = config.num_layers_to_contract as number;
  const remove = Math.max(1, Math.round(ratio * count));
  if (remove >= shape.num_layers) {
    throw invalidConfig(
      `contraction_ratio × num_layers_to_contract removes ${remove} of the ${shape.num_layers} layers of ${model.name}; at most ${shape.num_layers - 1} can go.`,
      'hyperparams.num_layers_to_contract',
    );
  }
}

/** The part of the spec every type shares. */
function commonSpec(
  type: JobType,
  model: SpecModel,
  body: TrainingJobCreate,
  template: TemplateConfig,
  outputName: string | undefined,
) {
  return defined({
    type,
    base_model: model,
    // every spec names its seed (the request's, else its template's) and output (null: the worker
    // picks `<job id>-<method>`); a fine-tune's settings name it again (typeSpec)
    seed: body.training_config?.seed ?? template.training_config?.seed ?? TRAINING_DEFAULTS.seed,
    output_name: outputName ?? null,
    run_name: body.run_name,
    template: body.template,
    wandb_project: body.wandb_project,
  });
}

/** The type-specific part of the spec. */
function typeSpec(
  type: JobType,
  method: string | null,
  body: TrainingJobCreate,
  template: TemplateConfig,
  hp: Hyperparams,
  format: string | null,
) {
  if (type === 'finetune') {
    if (method === 'full') refuseLoraSettings(body, template);
    const { lora, training } = mergeSettings(template, body);
    const numNodes = body.num_nodes ?? 1;
    if (numNodes > 1 && body.distributed === false) {
      throw invalidConfig(
        `num_nodes ${numNodes} trains on ${numNodes} workers at once, which is a distributed run; ` +
          'leave distributed out (or true), or use num_nodes: 1.',
        'distributed',
      );
    }
    return {
      method,
      seed: training.seed,
      lora,
      training,
      dataset_format: format,
      // num_nodes > 1 is a gang: that many workers, scheduled together (queue/gang.ts)
      distributed: { enabled: body.distributed ?? numNodes > 1, num_nodes: numNodes },
    };
  }
  if (type === 'train') {
    return defined({
      turns: hp.turns ?? 1,
      cycles: hp.cycles,
      steps_per_cycle: hp.steps_per_cycle,
      lr: hp.lr,
      seq_len: hp.seq_len,
      growth: defined({ new_layers: hp.new_layers }),
      dataset_format: format ?? undefined,
    });
  }
  if (type === 'contract') {
    return defined({
      contraction_ratio: hp.contraction_ratio ?? 0.5,
      num_layers_to_contract: hp.num_layers_to_contract ?? 8,
      dataset_format: format ?? undefined,
    });
  }
  if (type === 'merge') return { export_gguf: false, quantization_types: [] };
  return defined({ dataset_format: format ?? undefined });
}

/** Tokens the run will process, for the cost estimate. */
function plannedTokens(
  type: JobType,
  spec: Record<string, unknown>,
  stats: { tokens: number },
  totalSteps: number | null,
) {
  if (type === 'finetune') {
    const t = spec.training as TrainingSettings;
    return totalSteps && t.max_steps > 0
      ? t.max_steps * t.batch_size * t.gradient_accumulation_steps * t.max_seq_length
      : stats.tokens * t.num_epochs;
  }
  if (type === 'train') return stats.tokens * ((spec.turns as number) ?? 1);
  return stats.tokens;
}

/**
 * Everything createTrainingJob needs before it writes anything: the job to enqueue, the data to
 * store, and the cost estimate for the budget check. Invalid combinations are `400 invalid_config`
 * naming the field.
 */
export async function planTrainingJob(
  ctx: AppContext,
  tenantId: string,
  body: TrainingJobCreate,
): Promise<TrainingJobPlan> {
  if (body.backend === 'native') return planPromptOptimizeJob(ctx, tenantId, body);
  if (body.prompt_optimization) {
    throw invalidConfig('prompt_optimization applies only with backend native.', 'prompt_optimization');
  }
  if (body.type === 'prompt_optimize') {
    throw invalidConfig('A prompt_optimize job is made with backend: native.', 'type');
  }
  const requiredDevice = await requiredDeviceOf(ctx, body.backend);
  const template = body.template ? await getTemplateConfig(ctx, tenantId, body.template) : {};
  const type: JobType = body.type ?? template.type ?? 'finetune';
  refuseFieldsTypeIgnores(type, body);
  if (body.template) refuseTemplatePresetsTypeIgnores(type, body.template, template);
  const hp = { ...template.hyperparams, ...body.hyperparams } as Hyperparams;
  const method = type === 'finetune' ? (body.method ?? template.method ?? 'lora') : null;

  let resolved: ResolvedModel;
  let parent: JobRow | null = null;
  if (type === 'merge') {
    parent = await mergeParent(ctx, tenantId, body.parent_job_id);
    resolved = { model: specModelOfJob(parent), params: null, modelId: null };
  } else {
    resolved = await resolveModel(ctx, tenantId, type, body, template, hp);
  }

  const data = await planData(ctx, tenantId, type, body, body.run_name);
  const stats = dataStats(data);
  const outputName = outputNameOf(body, hp);
  const config: Record<string, unknown> = {
    ...commonSpec(type, resolved.model, body, template, outputName),
    ...typeSpec(type, method, body, template, hp, stats.format),
  };
  // the worker evaluates on it (input `eval_dataset`) instead of holding part of the data out
  if (body.eval_dataset_id) {
    const evalSet = await ctx
      .knex('datasets')
      .where({ tenant_id: tenantId, id: body.eval_dataset_id })
      .first('id');
    if (!evalSet) throw notFound('dataset', body.eval_dataset_id, 'eval_dataset_id');
    config.eval_dataset_id = evalSet.id;
  }
  if (resolved.adapter) refuseUnstackableStart(method, config.lora as LoraSettings | undefined);
  await checkMethodRunnable(ctx, method, requiredDevice);
  if (type === 'finetune') {
    fitSeqLengthToModel(body, config.training as TrainingSettings, resolved);
    checkFinetuneSettings(body, config.training as TrainingSettings, stats.examples);
  }
  if (type === 'contract') checkContraction(config, resolved.model);
  const totalSteps =
    type === 'finetune' ? finetuneTotalSteps(config.training as TrainingSettings, stats.examples) : null;
  const estimatedUsd =
    estimateJobCostUsd(ctx, {
      params: resolved.params,
      method,
      totalTokens: plannedTokens(type, config, stats, totalSteps),
    }) * // a gang holds num_nodes workers for the run's time (billing counts each)
    (type === 'finetune' ? (body.num_nodes ?? 1) : 1);
  return {
    job: {
      kind: 'training',
      type,
      method,
      name: body.run_name ?? null,
      config,
      secrets: defined({ hf_token: body.hf_token }),
      baseModel: resolved.model.name,
      parentJobId: parent?.id ?? body.parent_job_id ?? null,
      modelId: resolved.modelId,
      requiredDevice,
      priority: body.priority,
      maxAttempts: body.max_attempts,
      totalSteps,
      numNodes: type === 'finetune' ? (body.num_nodes ?? 1) : 1,
    },
    data,
    estimatedUsd,
  };
}

/** The model types the worker's GGUF exporter writes (`config.model_type`, the catalog's architecture). */
const GGUF_ARCHITECTURES = ['llama', 'qwen2'];

/**
 * `quantization_types` without `export_gguf` would be stored and never used (no GGUF is written),
 * and `export_gguf` with none would fail on the worker: both refused, for merges and distillations.
 */
export function refuseUnusedQuantization(
  options: { export_gguf?: boolean; quantization_types?: unknown[] },
  param: string,
): void {
  if (options.quantization_types !== undefined && !options.export_gguf) {
    throw invalidConfig('quantization_types applies only with export_gguf: true.', param);
  }
  if (options.export_gguf && options.quantization_types?.length === 0) {
    throw invalidConfig(
      'export_gguf needs at least one quantization type (leave quantization_types out for q4_k_m).',
      param,
    );
  }
}

/**
 * The config of a merge job created from the merge endpoint (seed 001's `POST …/merge`). Options
 * the worker would refuse or skip are refused here: `quantization_types` without `export_gguf`, and
 * `export_gguf` for a base model whose architecture the exporter does not write.
 */
export function mergeJobPlan(parent: JobRow, options: Schemas['MergeRequest']): TrainingJobPlan['job'] {
  const model = specModelOfJob(parent);
  refuseUnusedQuantization(options, 'quantization_types');
  const architecture = builtinModelShape(model.source)?.architecture;
  if (options.export_gguf && architecture && !GGUF_ARCHITECTURES.includes(architecture)) {
    throw invalidConfig(
      `GGUF export writes ${GGUF_ARCHITECTURES.join(' and ')} models; ${model.name} is ${architecture}.`,
      'export_gguf',
    );
  }
  return {
    kind: 'training',
    type: 'merge',
    method: null,
    config: defined({
      type: 'merge',
      base_model: model,
      output_name: options.output_name,
      export_gguf: options.export_gguf ?? false,
      quantization_types: options.quantization_types ?? (options.export_gguf ? ['q4_k_m'] : []),
    }),
    // the parent's secrets were erased when it ended: a gated model needs the token again
    secrets: defined({ hf_token: options.hf_token }),
    baseModel: model.name,
    parentJobId: parent.id,
    priority: parent.priority,
  };
}
