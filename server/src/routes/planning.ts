import type { AppContext } from '../context.js';
import { invalidConfig } from '../errors.js';
import { type BodyOf, isoRequired, type Routes, type Schemas, tenantOf } from '../http.js';
import { WORKER_ONLINE_SECONDS } from '../queue/claim.js';
import { getAutoConfig, updateAutoConfig } from '../services/auto-training.js';
import { getBaseModel, resolveBaseModel } from '../services/catalog.js';
import { estimateTokens, getDataset } from '../services/datasets.js';
import { estimate, recommend } from '../services/estimate.js';
import { servingWorkersOnline } from '../services/inference.js';

const STATUSES = ['pending', 'running', 'completed', 'failed', 'cancelled'] as const;

/**
 * Each online worker and what it is running now: the jobs it holds a live lease on. The caller's
 * jobs are named; other tenants' are only counted.
 */
async function onlineWorkers(ctx: AppContext, tenantId: string): Promise<Schemas['OnlineWorker'][]> {
  const workers = await ctx.knex.raw(
    `SELECT id, capabilities, last_seen_at FROM workers
     WHERE last_seen_at > now() - make_interval(secs => ?) ORDER BY id`,
    [WORKER_ONLINE_SECONDS],
  );
  const rows = workers.rows as { id: string; capabilities: unknown; last_seen_at: Date | string }[];
  if (rows.length === 0) return [];
  const running = await ctx
    .knex('jobs')
    .select('id', 'tenant_id', 'lease_owner', 'kind', 'type', 'method', 'phase', 'current_step')
    .select('total_steps', 'started_at')
    .where('status', 'running')
    .andWhere('lease_expires_at', '>', ctx.knex.fn.now())
    .whereIn(
      'lease_owner',
      rows.map((w) => w.id),
    )
    .orderBy([{ column: 'started_at' }, { column: 'id' }]);
  const jobs = running as {
    id: string;
    tenant_id: string;
    lease_owner: string;
    kind: 'training' | 'distillation';
    type: string;
    method: string | null;
    phase: string;
    current_step: number;
    total_steps: number | null;
    started_at: Date | string | null;
  }[];
  const iso = (t: Date | string) => new Date(t).toISOString();
  return rows.map((w) => {
    const caps = (typeof w.capabilities === 'string' ? JSON.parse(w.capabilities) : w.capabilities) as {
      device?: string;
      job_types?: string[];
      methods?: string[];
    };
    const held = jobs.filter((j) => j.lease_owner === w.id);
    const mine = held.filter((j) => j.tenant_id === tenantId);
    return {
      worker_id: w.id,
      device: caps.device ?? 'cpu',
      job_types: caps.job_types ?? [],
      methods: caps.methods ?? null,
      last_seen_at: iso(w.last_seen_at),
      busy: held.length > 0,
      running_jobs: mine.map((j) => ({
        job_id: j.id,
        kind: j.kind,
        type: j.type,
        method: j.method,
        phase: j.phase,
        current_step: Number(j.current_step),
        total_steps: j.total_steps == null ? null : Number(j.total_steps),
        started_at: j.started_at == null ? null : iso(j.started_at),
      })),
      other_running_jobs: held.length - mine.length,
    };
  });
}

/**
 * The parameter count (and context length, when the catalog knows it) of the model a planning
 * request names. An explicit `params` wins; a model without a known count needs one.
 */
async function modelSize(
  ctx: AppContext,
  tenantId: string,
  body: { params?: number; base_model?: string; base_model_id?: string },
): Promise<{ params: number; contextLength: number | null }> {
  let contextLength: number | null = null;
  let params = body.params ?? null;
  if (body.base_model || body.base_model_id) {
    const resolved = await resolveBaseModel(ctx, tenantId, body);
    if (resolved.id) contextLength = (await getBaseModel(ctx, tenantId, resolved.id)).context_length;
    params ??= resolved.params;
    if (params == null) {
      throw invalidConfig(`The parameter count of ${resolved.name} is unknown; pass params.`, 'params');
    }
  }
  if (params == null)
    throw invalidConfig('Name the model (base_model or base_model_id) or give params.', 'base_model');
  return { params, contextLength };
}

/** Dataset tokens from `dataset_tokens`, `dataset_bytes` (≈4 a token) or a dataset's estimate. */
async function datasetTokens(
  ctx: AppContext,
  tenantId: string,
  body: { dataset_id?: string; dataset_tokens?: number; dataset_bytes?: number },
): Promise<number | null> {
  if (body.dataset_tokens !== undefined) return body.dataset_tokens;
  if (body.dataset_bytes !== undefined) return estimateTokens(body.dataset_bytes);
  if (body.dataset_id) return (await getDataset(ctx, tenantId, body.dataset_id)).tokens_est;
  return null;
}

export const planningRoutes: Routes = {
  async estimateTraining(req, res, ctx) {
    const tenantId = tenantOf(req);
    const body = req.body as BodyOf<'estimateTraining'>;
    const { params } = await modelSize(ctx, tenantId, body);
    const tokens = await datasetTokens(ctx, tenantId, body);
    const maxSteps = body.max_steps !== undefined && body.max_steps > 0 ? body.max_steps : null;
    if (tokens == null && maxSteps == null) {
      throw invalidConfig(
        'Give the data (dataset_id or dataset_tokens) or a fixed max_steps.',
        'dataset_tokens',
      );
    }
    const result = estimate({
      params,
      method: body.method ?? 'lora',
      batchSize: body.batch_size ?? 4,
      maxSeqLength: body.max_seq_length ?? 2048,
      loraRank: body.lora_rank ?? 16,
      numEpochs: body.num_epochs ?? 3,
      maxSteps,
      datasetTokens: tokens,
      useGradientCheckpointing: body.use_gradient_checkpointing ?? false,
      gpuTflops: body.gpu_tflops ?? 312,
      gpuMemoryGb: body.gpu_memory_gb ?? 80,
      mfu: body.mfu ?? 0.35,
      numGpus: body.num_gpus ?? 1,
      pricePerGpuHour: ctx.config.pricePerGpuHour,
    });
    if (![result.estimated_seconds, result.estimated_cost_usd, result.memory_gb.total].every(Number.isFinite))
      throw invalidConfig('These settings put the estimate out of range; check gpu_tflops and mfu.', 'mfu');
    res.json(result satisfies Schemas['Estimate']);
  },

  async recommendTraining(req, res, ctx) {
    const tenantId = tenantOf(req);
    const body = req.body as BodyOf<'recommendTraining'>;
    const { params, contextLength } = await modelSize(ctx, tenantId, body);
    const tokens = await datasetTokens(ctx, tenantId, body);
    if (tokens == null) {
      throw invalidConfig('Give the data: dataset_id, dataset_tokens or dataset_bytes.', 'dataset_tokens');
    }
    res.json(recommend({ params, datasetTokens: tokens, contextLength }) satisfies Schemas['Recommendation']);
  },

  async getTrainingStats(req, res, ctx) {
    const tenantId = tenantOf(req);
    const byStatusType = await ctx.knex.raw(
      `
      SELECT
        status,
        type,
        count(*)::int AS jobs,
        -- compute and tokens come from completed jobs' results (numbers only; anything else is ignored)
        COALESCE(sum(CASE WHEN status = 'completed' AND jsonb_typeof(results->'gpu_seconds') = 'number'
                          THEN (results->>'gpu_seconds')::float8 END), 0)::float8 AS gpu_seconds,
        COALESCE(sum(CASE WHEN status = 'completed' AND jsonb_typeof(results->'tokens_processed') = 'number'
                          THEN (results->>'tokens_processed')::float8 END), 0)::float8 AS tokens,
        COALESCE(sum(cost_accrued), 0)::float8 AS cost
      FROM jobs WHERE tenant_id = ?
      GROUP BY status, type`,
      [tenantId],
    );
    const byStatus: Record<string, number> = Object.fromEntries(STATUSES.map((s) => [s, 0]));
    const byType: Record<string, number> = {};
    let totalJobs = 0;
    let gpuSeconds = 0;
    let tokens = 0;
    let cost = 0;
    for (const row of byStatusType.rows as {
      status: string;
      type: string;
      jobs: number;
      gpu_seconds: number;
      tokens: number;
      cost: number;
    }[]) {
      const n = Number(row.jobs);
      totalJobs += n;
      byStatus[row.status] = (byStatus[row.status] ?? 0) + n;
      byType[row.type] = (byType[row.type] ?? 0) + n;
      gpuSeconds += Number(row.gpu_seconds);
      tokens += Number(row.tokens);
      cost += Number(row.cost);
    }
    const count = async (table: string) =>
      Number(
        (await ctx.knex(table).where({ tenant_id: tenantId }).count({ count: '*' }).first())?.count ?? 0,
      );
    const [adapters, models, datasets] = await Promise.all([
      count('adapters'),
      count('models'),
      count('datasets'),
    ]);
    res.json({
      total_jobs: totalJobs,
      by_status: byStatus,
      by_type: byType,
      total_gpu_seconds: Number(gpuSeconds.toFixed(3)),
      total_tokens: Math.round(tokens),
      total_cost_usd: Number(cost.toFixed(4)),
      adapters,
      models,
      datasets,
    } satisfies Schemas['TrainingStats']);
  },

  async getTrainingStatus(req, res, ctx) {
    const tenantId = tenantOf(req);
    const jobs = await ctx.knex.raw(
      `SELECT status, count(*)::int AS n FROM jobs WHERE tenant_id = ? GROUP BY status`,
      [tenantId],
    );
    const byStatus = new Map(
      (jobs.rows as { status: string; n: number }[]).map((r) => [r.status, Number(r.n)]),
    );
    const count = async (table: string) =>
      Number(
        (await ctx.knex(table).where({ tenant_id: tenantId }).count({ count: '*' }).first())?.count ?? 0,
      );
    const online = await ctx.knex.raw(
      `SELECT count(*)::int AS n FROM workers WHERE last_seen_at > now() - make_interval(secs => ?)`,
      [WORKER_ONLINE_SECONDS],
    );
    const workersOnline = Number(online.rows[0]?.n ?? 0);
    const workers = await onlineWorkers(ctx, tenantId);
    const serving = await servingWorkersOnline(ctx);
    res.json({
      running_jobs: byStatus.get('running') ?? 0,
      queued_jobs: byStatus.get('pending') ?? 0,
      completed_jobs: byStatus.get('completed') ?? 0,
      failed_jobs: byStatus.get('failed') ?? 0,
      model_count: await count('models'),
      dataset_count: await count('datasets'),
      runtime_available: workersOnline > 0,
      workers_online: workersOnline,
      workers,
      serving_workers: serving.map((w) => ({
        worker_id: w.worker_id,
        backend: w.backend as Schemas['ServingBackend'] | null,
        last_seen_at: isoRequired(w.last_seen_at),
      })),
    } satisfies Schemas['TrainingStatus']);
  },

  async getAutoTrainingConfig(req, res, ctx) {
    res.json((await getAutoConfig(ctx, tenantOf(req))) satisfies Schemas['AutoTrainingConfig']);
  },

  async updateAutoTrainingConfig(req, res, ctx) {
    const body = req.body as BodyOf<'updateAutoTrainingConfig'>;
    const config = await updateAutoConfig(ctx, tenantOf(req), body);
    res.json({ ok: true, config } satisfies Schemas['AutoTrainingConfigResponse']);
  },
};
