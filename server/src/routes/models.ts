import type { Knex } from 'knex';
import type { AppContext } from '../context.js';
import { badRequest, conflict, invalidConfig, notFound } from '../errors.js';
import {
  type BodyOf,
  iso,
  isoRequired,
  page,
  pathParam,
  type Routes,
  type Schemas,
  tenantOf,
} from '../http.js';
import { enqueueJob } from '../queue/enqueue.js';
import type { JobRow } from '../queue/types.js';
import {
  type BaseModelRow,
  checkModelSource,
  getBaseModel,
  isModelSource,
  resolveBaseModel,
  toBaseModelRow,
} from '../services/catalog.js';
import { getDataset } from '../services/datasets.js';
import { estimateJobCostUsd } from '../services/estimate.js';
import { idempotent } from '../services/idempotency.js';
import { importGguf, loopbackOllamaUrl, ollamaModelName } from '../services/ollama.js';
import { listPage, newestFirst } from '../services/paging.js';
import {
  type FileRow,
  finiteScores,
  jobKinds,
  jobOutputFiles,
  type ModelRow,
  outputFileView,
  toModelRow,
} from '../services/registry.js';

const json = <T>(value: unknown): T => (typeof value === 'string' ? JSON.parse(value) : value) as T;

/** Tokens a benchmark example is assumed to hold, for its cost estimate. */
const BENCHMARK_TOKENS_PER_EXAMPLE = 512;

function baseModelView(row: BaseModelRow): Schemas['BaseModel'] {
  return {
    id: row.id,
    name: row.name,
    source: row.source,
    params: row.params,
    architecture: row.architecture,
    context_length: row.context_length,
    builtin: row.tenant_id === null,
    created_at: isoRequired(row.created_at),
  };
}

/** Output models with their files (their job's outputs) and whether each is the active one. */
async function modelViews(ctx: AppContext, tenantId: string, rows: ModelRow[]): Promise<Schemas['Model'][]> {
  const jobIds = rows.map((r) => r.job_id);
  const [files, kinds, tenant] = await Promise.all([
    jobOutputFiles(ctx.knex, tenantId, jobIds),
    jobKinds(ctx.knex, jobIds),
    ctx.knex('tenants').where({ id: tenantId }).first('active_model_id'),
  ]);
  return rows.map((row) => ({
    id: row.id,
    job_id: row.job_id,
    name: row.name,
    kind: row.kind,
    base_model: row.base_model,
    params: row.params,
    created_at: isoRequired(row.created_at),
    active: tenant?.active_model_id === row.id,
    provider_model: row.provider_model,
    ollama_name: row.ollama_name,
    imported_at: iso(row.imported_at),
    benchmark: row.benchmark == null ? null : json<Record<string, unknown>>(row.benchmark),
    files: (files.get(row.job_id) ?? []).map((f) => outputFileView(ctx, f, kinds.get(row.job_id))),
  }));
}

async function getModelRow(db: Knex | Knex.Transaction, tenantId: string, id: string): Promise<ModelRow> {
  const row = await db('models').where({ tenant_id: tenantId, id }).first();
  if (!row) throw notFound('model', id, 'model_id');
  return toModelRow(row);
}

async function modelView(ctx: AppContext, tenantId: string, id: string): Promise<Schemas['Model']> {
  const [view] = await modelViews(ctx, tenantId, [await getModelRow(ctx.knex, tenantId, id)]);
  return view!;
}

/** The GGUF to import: the asked quantization (`model-q8_0.gguf`), else q4_k_m, q8_0, then any. */
function pickGguf(files: FileRow[], quantization: string | undefined): FileRow | undefined {
  const ggufs = files.filter((f) => f.name.toLowerCase().endsWith('.gguf'));
  const withType = (type: string) => ggufs.find((f) => f.name.toLowerCase().endsWith(`${type}.gguf`));
  if (quantization) return withType(quantization.toLowerCase());
  return withType('q4_k_m') ?? withType('q8_0') ?? ggufs[0];
}

/**
 * The spec's `base_model` of a benchmark: an adapter is applied to the base its job trained from
 * (`source` is what the worker loads); any other model comes whole as `model` input files.
 */
async function benchmarkBase(
  ctx: AppContext,
  tenantId: string,
  model: ModelRow,
  producer: JobRow | undefined,
): Promise<{ id: string | null; name: string; source: string | null }> {
  if (model.kind !== 'adapter' && model.kind !== 'distilled')
    return { id: null, name: model.name, source: null };
  const config = producer?.config ?? {};
  const recorded = (producer?.type === 'distill' ? config.student : config.base_model) as
    | { id?: string | null; name?: string; source?: string | null }
    | undefined;
  if (recorded && typeof recorded === 'object' && recorded.source) {
    return {
      id: recorded.id ?? null,
      name: recorded.name ?? model.base_model ?? model.name,
      source: checkModelSource(ctx.config, recorded.source, 'model_id'),
    };
  }
  const name = model.base_model ?? model.name;
  const base = await resolveBaseModel(ctx, tenantId, { base_model: name }).catch(() => null);
  return {
    id: base?.id ?? null,
    name,
    source: checkModelSource(ctx.config, base?.source ?? name, 'model_id'),
  };
}

/** Benchmark job's answer: its status, and the scores once it completed. */
async function benchmarkView(
  db: Knex,
  tenantId: string,
  modelId: string,
  jobId: string,
): Promise<Schemas['BenchmarkResponse']> {
  const job = await db('jobs')
    .where({ tenant_id: tenantId, id: jobId })
    .first('status', 'results', 'finished_at');
  const results = json<Record<string, unknown>>(job?.results ?? {});
  const scores = job?.status === 'completed' ? finiteScores(results.scores) : null;
  return {
    model_id: modelId,
    job_id: jobId,
    status: job?.status ?? 'pending',
    scores,
    completed_at: job?.status === 'completed' ? iso(job.finished_at) : null,
  };
}

export const modelRoutes: Routes = {
  // ---------------------------------------------------------------- base-model catalog
  async listBaseModels(req, res, ctx) {
    const tenantId = tenantOf(req);
    const body = await listPage(
      'models',
      ctx.knex('base_models').where((q) => q.where('tenant_id', tenantId).orWhereNull('tenant_id')),
      page(req),
      // Shipped entries first (smallest model first), then the tenant's own, newest first.
      [
        { sql: 'CASE WHEN tenant_id IS NULL THEN 0 ELSE 1 END', order: 'asc', kind: 'integer' },
        {
          sql: 'CASE WHEN tenant_id IS NULL THEN coalesce(params, 0) ELSE 0 END',
          order: 'asc',
          kind: 'integer',
        },
        ...newestFirst({ column: 'name', order: 'asc' }),
      ],
      (rows) => rows.map((r) => baseModelView(toBaseModelRow(r))),
    );
    res.json(body satisfies Schemas['BaseModelList']);
  },

  async createBaseModel(req, res, ctx) {
    const tenantId = tenantOf(req);
    const body = req.body as BodyOf<'createBaseModel'>;
    if (!isModelSource(body.source)) {
      throw invalidConfig(
        'source must be a hub id like "org/name" or an absolute directory path on the workers.',
        'source',
      );
    }
    checkModelSource(ctx.config, body.source, 'source');
    const { id } = await idempotent(ctx, req, 'createBaseModel', 'bm', async (modelId) => {
      await ctx.knex.transaction(async (trx) => {
        const taken = await trx('base_models')
          .where('name', body.name)
          .andWhere((q) => q.where('tenant_id', tenantId).orWhereNull('tenant_id'))
          .first('tenant_id');
        if (taken) {
          throw conflict(
            taken.tenant_id === null
              ? `"${body.name}" is a built-in base model; choose another name.`
              : `A base model named "${body.name}" already exists.`,
            'conflict',
            'name',
          );
        }
        await trx('base_models').insert({
          id: modelId,
          tenant_id: tenantId,
          name: body.name,
          source: body.source,
          params: body.params ?? null,
          architecture: body.architecture ?? null,
          context_length: body.context_length ?? null,
        });
      });
    });
    res
      .status(201)
      .json(
        baseModelView(await getBaseModel(ctx, tenantId, id, 'base_model_id')) satisfies Schemas['BaseModel'],
      );
  },

  // ---------------------------------------------------------------- output models
  async listModels(req, res, ctx) {
    const tenantId = tenantOf(req);
    const body = await listPage(
      'models',
      ctx.knex('models').where({ tenant_id: tenantId }),
      page(req),
      newestFirst(),
      (rows) => modelViews(ctx, tenantId, rows.map(toModelRow)),
    );
    res.json(body satisfies Schemas['ModelList']);
  },

  async getModel(req, res, ctx) {
    res.json((await modelView(ctx, tenantOf(req), pathParam(req, 'model_id'))) satisfies Schemas['Model']);
  },

  async activateModel(req, res, ctx) {
    const tenantId = tenantOf(req);
    const id = pathParam(req, 'model_id');
    const body = (req.body ?? {}) as BodyOf<'activateModel'>;
    const row = await ctx.knex.transaction(async (trx) => {
      const model = await getModelRow(trx, tenantId, id);
      if (body.provider_model)
        await trx('models').where({ id }).update({ provider_model: body.provider_model });
      await trx('tenants').where({ id: tenantId }).update({ active_model_id: id });
      return model;
    });
    const model = await modelView(ctx, tenantId, id);
    res.json({
      ok: true,
      active_model: body.provider_model ?? row.name,
      model,
    } satisfies Schemas['ActivateModelResponse']);
  },

  async importModelToOllama(req, res, ctx) {
    const tenantId = tenantOf(req);
    const id = pathParam(req, 'model_id');
    const body = (req.body ?? {}) as BodyOf<'importModelToOllama'>;
    if (body.base_model !== undefined) {
      // Seed 004 names a base for Ollama to stack an adapter on; Tunery's GGUF files are whole
      // models, so there is nothing to stack. Refused rather than ignored.
      throw badRequest(
        'base_model is not supported: Tunery imports whole-model GGUF files, which need no base model in Ollama.',
        'base_model',
      );
    }
    const base = loopbackOllamaUrl(body.ollama_url);
    const model = await getModelRow(ctx.knex, tenantId, id);
    const files = (await jobOutputFiles(ctx.knex, tenantId, [model.job_id])).get(model.job_id) ?? [];
    const gguf = pickGguf(files, body.quantization);
    if (!gguf) {
      throw conflict(
        body.quantization
          ? `Model ${id} has no ${body.quantization} GGUF file.`
          : `Model ${id} has no GGUF file; export one first (export_gguf on a distillation or merge job).`,
        'conflict',
        body.quantization ? 'quantization' : null,
      );
    }
    const ollamaName = ollamaModelName(tenantId, body.model_name ?? model.name);
    await importGguf(ctx, base, gguf, ollamaName);
    const [updated] = await ctx
      .knex('models')
      .where({ tenant_id: tenantId, id })
      .update({ ollama_name: ollamaName, imported_at: ctx.knex.fn.now() })
      .returning(['id', 'ollama_name', 'imported_at']);
    res.json({
      model: { id, ollama_name: ollamaName, imported_at: isoRequired(updated.imported_at) },
    } satisfies Schemas['OllamaImportResponse']);
  },

  async benchmarkModel(req, res, ctx) {
    const tenantId = tenantOf(req);
    const modelId = pathParam(req, 'model_id');
    const body = (req.body ?? {}) as BodyOf<'benchmarkModel'>;
    const model = await getModelRow(ctx.knex, tenantId, modelId);
    const producer = (await ctx.knex('jobs').where({ tenant_id: tenantId, id: model.job_id }).first()) as
      | JobRow
      | undefined;
    // Without a dataset, the model is scored on the data it was trained on.
    const datasetId = body.dataset_id ?? producer?.dataset_id ?? null;
    if (!datasetId) {
      throw invalidConfig(
        `Model ${modelId} has no training dataset to score on; give dataset_id.`,
        'dataset_id',
      );
    }
    const dataset = await getDataset(ctx, tenantId, datasetId);
    const maxExamples = body.max_examples ?? 200;
    const base = await benchmarkBase(ctx, tenantId, model, producer);
    const { id: jobId } = await idempotent(
      ctx,
      req,
      'benchmarkModel',
      'job',
      async (newJobId) => {
        const cost = estimateJobCostUsd(ctx, {
          params: model.params,
          method: 'inference',
          totalTokens: Math.min(maxExamples, dataset.num_examples) * BENCHMARK_TOKENS_PER_EXAMPLE,
        });
        await ctx.knex.transaction(async (trx) => {
          await enqueueJob(ctx, trx, {
            id: newJobId,
            tenantId,
            kind: 'training',
            type: 'benchmark',
            name: `benchmark ${model.name}`,
            config: {
              type: 'benchmark',
              base_model: base,
              model_id: model.id,
              dataset_id: dataset.id,
              dataset_format: dataset.format,
              max_examples: maxExamples,
            },
            baseModel: model.base_model,
            datasetId: dataset.id,
            parentJobId: model.job_id,
            modelId: model.id,
            estimatedUsd: cost,
          });
        });
      },
      { ...body, model_id: modelId },
    );
    res
      .status(202)
      .json((await benchmarkView(ctx.knex, tenantId, modelId, jobId)) satisfies Schemas['BenchmarkResponse']);
  },
};
