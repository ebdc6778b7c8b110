import { posix } from 'node:path';
import type { Knex } from 'knex';
import type { Config } from '../config.js';
import type { AppContext } from '../context.js';
import { invalidConfig, notFound } from '../errors.js';

/** One row of `base_models` (tenant_id null: shipped with the server). */
export interface BaseModelRow {
  id: string;
  tenant_id: string | null;
  name: string;
  source: string;
  params: number | null;
  architecture: string | null;
  context_length: number | null;
  created_at: Date;
}

/** What a job or an estimate starts from: the catalog entry (if any) and what workers load. */
export interface ResolvedBaseModel {
  id: string | null;
  name: string;
  source: string;
  params: number | null;
  /** The longest sequence the model takes (catalog entries that say; null: unknown). */
  contextLength: number | null;
}

interface BuiltinModel {
  name: string;
  source: string;
  params: number;
  architecture: string;
  context_length: number;
  /** `num_hidden_layers` of the published config: what a contract run may remove layers from. */
  num_layers: number;
}

/**
 * The shipped catalog. Parameter counts are the exact totals of the published checkpoints
 * (embeddings included, tied embeddings counted once); context lengths are the models' configured
 * `max_position_embeddings` as used without rope scaling; layer counts their `num_hidden_layers`.
 */
const BUILTIN_MODELS: BuiltinModel[] = [
  {
    name: 'smollm2-135m-instruct',
    source: 'HuggingFaceTB/SmolLM2-135M-Instruct',
    params: 134_515_008,
    architecture: 'llama',
    context_length: 8192,
    num_layers: 30,
  },
  {
    name: 'smollm2-360m-instruct',
    source: 'HuggingFaceTB/SmolLM2-360M-Instruct',
    params: 361_821_120,
    architecture: 'llama',
    context_length: 8192,
    num_layers: 32,
  },
  {
    name: 'qwen2.5-0.5b-instruct',
    source: 'Qwen/Qwen2.5-0.5B-Instruct',
    params: 494_032_768,
    architecture: 'qwen2',
    context_length: 32768,
    num_layers: 24,
  },
  {
    name: 'qwen2.5-1.5b-instruct',
    source: 'Qwen/Qwen2.5-1.5B-Instruct',
    params: 1_543_714_304,
    architecture: 'qwen2',
    context_length: 32768,
    num_layers: 28,
  },
  {
    name: 'qwen2.5-7b-instruct',
    source: 'Qwen/Qwen2.5-7B-Instruct',
    params: 7_615_616_512,
    architecture: 'qwen2',
    context_length: 32768,
    num_layers: 28,
  },
  {
    name: 'tinyllama-1.1b-chat',
    source: 'TinyLlama/TinyLlama-1.1B-Chat-v1.0',
    params: 1_100_048_384,
    architecture: 'llama',
    context_length: 2048,
    num_layers: 22,
  },
  {
    name: 'llama-3.2-1b',
    source: 'meta-llama/Llama-3.2-1B',
    params: 1_235_814_400,
    architecture: 'llama',
    context_length: 131072,
    num_layers: 16,
  },
  {
    name: 'llama-3.2-1b-instruct',
    source: 'meta-llama/Llama-3.2-1B-Instruct',
    params: 1_235_814_400,
    architecture: 'llama',
    context_length: 131072,
    num_layers: 16,
  },
  {
    name: 'llama-3.2-3b',
    source: 'meta-llama/Llama-3.2-3B',
    params: 3_212_749_824,
    architecture: 'llama',
    context_length: 131072,
    num_layers: 28,
  },
  {
    name: 'llama-3.2-3b-instruct',
    source: 'meta-llama/Llama-3.2-3B-Instruct',
    params: 3_212_749_824,
    architecture: 'llama',
    context_length: 131072,
    num_layers: 28,
  },
  {
    name: 'llama-3.1-8b',
    source: 'meta-llama/Llama-3.1-8B',
    params: 8_030_261_248,
    architecture: 'llama',
    context_length: 131072,
    num_layers: 32,
  },
  {
    name: 'llama-3.1-8b-instruct',
    source: 'meta-llama/Llama-3.1-8B-Instruct',
    params: 8_030_261_248,
    architecture: 'llama',
    context_length: 131072,
    num_layers: 32,
  },
  {
    name: 'codellama-7b-instruct',
    source: 'codellama/CodeLlama-7b-Instruct-hf',
    params: 6_738_546_688,
    architecture: 'llama',
    context_length: 16384,
    num_layers: 32,
  },
  {
    name: 'mistral-7b-instruct-v0.3',
    source: 'mistralai/Mistral-7B-Instruct-v0.3',
    params: 7_248_023_552,
    architecture: 'mistral',
    context_length: 32768,
    num_layers: 32,
  },
  {
    name: 'phi-3-mini-4k-instruct',
    source: 'microsoft/Phi-3-mini-4k-instruct',
    params: 3_821_079_552,
    architecture: 'phi3',
    context_length: 4096,
    num_layers: 32,
  },
  {
    name: 'gemma-2-2b-it',
    source: 'google/gemma-2-2b-it',
    params: 2_614_341_888,
    architecture: 'gemma2',
    context_length: 8192,
    num_layers: 26,
  },
];

/** Stable ids for shipped entries, so they are the same on every server: `bm_qwen2_5-7b-instruct`. */
export const builtinBaseModelId = (name: string) => `bm_${name.replace(/[^A-Za-z0-9-]/g, '_')}`;

/** Hub ids look like `org/name` (no spaces, exactly one slash). */
const HUB_ID = /^[A-Za-z0-9][A-Za-z0-9._-]*\/[A-Za-z0-9][A-Za-z0-9._-]*$/;

/** A hub id (`org/name`) or an absolute directory path: the shapes of source workers load. */
export const isModelSource = (value: string): boolean => HUB_ID.test(value) || value.startsWith('/');

const within = (path: string, root: string) =>
  path === root || path.startsWith(root === '/' ? root : `${root}/`);

/**
 * A model source as a job may name it: a hub id as is; an absolute path only when it is normalized
 * (no `..`, `.` or `//`), inside one of the operator's model roots (`TUNERY_MODEL_ROOTS`) and outside
 * the server's data directory, where every tenant's files live: output models are named by id
 * (`source_model_id`), which resolves for their own tenant only. Workers check the real path again
 * (symlinks) before loading. `400 invalid_config` naming `param` otherwise.
 */
export function checkModelSource(
  config: Pick<Config, 'modelRoots' | 'dataDir'>,
  source: string,
  param: string,
): string {
  if (!source.startsWith('/')) return source;
  const trimmed = source.length > 1 ? source.replace(/\/+$/, '') : source;
  if (posix.normalize(trimmed) !== trimmed) {
    throw invalidConfig(`Model path "${source}" must be normalized (no "..", "." or "//").`, param);
  }
  const hint =
    'use a catalog name, a hub id like "org/name", or source_model_id for one of your output models';
  if (config.modelRoots.length === 0) {
    throw invalidConfig(
      `Absolute paths are not accepted as models on this server (its operator set no TUNERY_MODEL_ROOTS): ${hint}.`,
      param,
    );
  }
  if (within(trimmed, config.dataDir) || !config.modelRoots.some((root) => within(trimmed, root))) {
    throw invalidConfig(
      `Model path "${source}" is not inside a model folder this server allows (TUNERY_MODEL_ROOTS): ${hint}.`,
      param,
    );
  }
  return source;
}

/**
 * What the catalog knows of a shipped model's shape, by the source workers load (`org/name`): its
 * layer count and architecture; null for any other model (its config is known only to workers).
 */
export function builtinModelShape(
  source: string | null,
): { num_layers: number; architecture: string } | null {
  const model = source ? BUILTIN_MODELS.find((m) => m.source === source) : undefined;
  return model ? { num_layers: model.num_layers, architecture: model.architecture } : null;
}

/** Seeds the shipped base-model entries; re-running updates them in place. */
export async function seedCatalog(knex: Knex): Promise<void> {
  for (const { num_layers: _layers, ...model } of BUILTIN_MODELS) {
    const row = { id: builtinBaseModelId(model.name), tenant_id: null, ...model };
    await knex('base_models')
      .insert(row)
      .onConflict('id')
      .merge(['name', 'source', 'params', 'architecture', 'context_length']);
  }
}

/** Normalizes a `base_models` row (bigint columns come back as strings from pg). */
export function toBaseModelRow(row: Record<string, unknown>): BaseModelRow {
  return {
    ...(row as unknown as BaseModelRow),
    params: row.params == null ? null : Number(row.params),
    context_length: row.context_length == null ? null : Number(row.context_length),
  };
}

const visibleTo = (db: Knex | Knex.Transaction, tenantId: string) =>
  db('base_models').where((q) => q.where('tenant_id', tenantId).orWhereNull('tenant_id'));

/** A catalog entry by id: the tenant's own or a shipped one; 404 otherwise. */
export async function getBaseModel(
  ctx: Pick<AppContext, 'knex'>,
  tenantId: string,
  id: string,
  param = 'base_model_id',
  db: Knex | Knex.Transaction = ctx.knex,
): Promise<BaseModelRow> {
  const row = await visibleTo(db, tenantId).andWhere('id', id).first();
  if (!row) throw notFound('base model', id, param);
  return toBaseModelRow(row);
}

/** The tenant's entry first, then the shipped one, matching `column`. */
async function findVisible(
  db: Knex | Knex.Transaction,
  tenantId: string,
  column: 'name' | 'source',
  value: string,
): Promise<BaseModelRow | null> {
  const row = await visibleTo(db, tenantId)
    .andWhere(column, value)
    .orderByRaw('tenant_id IS NULL') // false (the tenant's) sorts before true (shipped)
    .orderBy('created_at')
    .first();
  return row ? toBaseModelRow(row) : null;
}

/**
 * What `base_model` / `base_model_id` name. By id: the tenant's or a shipped entry (404 otherwise).
 * By name: the tenant's entry, then the shipped one; then an entry whose source is that string (so
 * `Qwen/Qwen2.5-7B-Instruct` finds its parameter count); else a hub id (`org/name`) or an absolute
 * path is taken verbatim as the source. Anything else is `400 invalid_config`.
 */
export async function resolveBaseModel(
  ctx: Pick<AppContext, 'knex' | 'config'>,
  tenantId: string,
  ref: { base_model?: string; base_model_id?: string },
  db: Knex | Knex.Transaction = ctx.knex,
): Promise<ResolvedBaseModel> {
  const param = ref.base_model_id ? 'base_model_id' : 'base_model';
  // Catalog entries are checked too: the model roots may have changed since one was registered.
  const pick = (row: BaseModelRow): ResolvedBaseModel => ({
    id: row.id,
    name: row.name,
    source: checkModelSource(ctx.config, row.source, param),
    params: row.params,
    contextLength: row.context_length,
  });
  if (ref.base_model_id)
    return pick(await getBaseModel(ctx, tenantId, ref.base_model_id, 'base_model_id', db));
  const name = ref.base_model?.trim();
  if (!name) throw invalidConfig('Name a base model with base_model or base_model_id.', 'base_model');
  const byName =
    (await findVisible(db, tenantId, 'name', name)) ?? (await findVisible(db, tenantId, 'source', name));
  if (byName) return pick(byName);
  if (isModelSource(name)) {
    return {
      id: null,
      name,
      source: checkModelSource(ctx.config, name, param),
      params: null,
      contextLength: null,
    };
  }
  throw invalidConfig(
    `Unknown model "${name}": use a catalog name (GET /v1/base-models), a hub id like "org/name", or an absolute path on the workers.`,
    'base_model',
  );
}
