// Estimates, recommendations, counters and auto-training. The arithmetic is a plausible stand-in,
// not the server's: contract tests should assert shapes, not these numbers.
import type { components } from '../../generated/api.js';
import { badJson, type MockContext } from '../context.js';
import { MockHttpError, notFound } from '../errors.js';
import type { MockState } from '../state.js';

type Schemas = components['schemas'];

const PRICE_PER_GPU_HOUR = 2;

export function planningHandlers({ router, state }: MockContext) {
  router.post('/v1/training/estimate', 'estimateTraining', async ({ request, response }) => {
    const body = await request.json().catch(badJson);
    const params = modelParams(state, body.base_model_id, body.base_model, body.params);
    const method = body.method ?? 'lora';
    const batch = body.batch_size ?? 4;
    const seq = body.max_seq_length ?? 2048;
    const trainable = method === 'full' ? params : Math.round(params * 0.01 * ((body.lora_rank ?? 16) / 16));
    const weights = (params * (method === 'qlora' ? 0.5 : 2)) / 1e9;
    const gradients = (trainable * 2) / 1e9;
    const optimizer = (trainable * 8) / 1e9;
    const activations =
      (batch * seq * Math.sqrt(params) * 34 * (body.use_gradient_checkpointing ? 0.2 : 1)) / 1e9;
    const total = (weights + gradients + optimizer + activations) * 1.1;
    const datasetTokens = body.dataset_tokens ?? datasetTokensOf(state, body.dataset_id) ?? 1_000_000;
    const steps =
      body.max_steps && body.max_steps > 0
        ? body.max_steps
        : Math.max(1, Math.ceil((datasetTokens * (body.num_epochs ?? 3)) / (batch * seq)));
    const tokens = steps * batch * seq;
    const flops = 6 * params * tokens;
    const gpus = body.num_gpus ?? 1;
    const seconds = flops / ((body.gpu_tflops ?? 312) * 1e12 * (body.mfu ?? 0.35) * gpus);
    const r = (x: number) => Math.round(x * 1000) / 1000;
    const estimate: Schemas['Estimate'] = {
      params,
      trainable_params: trainable,
      method,
      memory_gb: {
        weights: r(weights),
        gradients: r(gradients),
        optimizer: r(optimizer),
        activations: r(activations),
        total: r(total),
      },
      fits: total <= (body.gpu_memory_gb ?? 80),
      total_tokens: tokens,
      total_steps: steps,
      estimated_seconds: r(seconds),
      estimated_cost_usd: r((seconds / 3600) * PRICE_PER_GPU_HOUR * gpus),
      assumptions: [
        'bf16 weights (4-bit for qlora), AdamW with two fp32 moments',
        '6 · params · tokens FLOPs at the given MFU',
        `$${PRICE_PER_GPU_HOUR} per GPU-hour`,
      ],
    };
    return response(200).json(estimate);
  });

  router.post('/v1/training/recommend', 'recommendTraining', async ({ request, response }) => {
    const body = await request.json().catch(badJson);
    const params = modelParams(state, body.base_model_id, body.base_model, body.params);
    const tokens =
      body.dataset_tokens ??
      datasetTokensOf(state, body.dataset_id) ??
      (body.dataset_bytes ? Math.ceil(body.dataset_bytes / 4) : 1_000_000);
    const lr = params < 1e9 ? 2e-4 : params < 1e10 ? 1e-4 : 5e-5;
    const epochs = tokens < 100_000 ? 5 : tokens < 10_000_000 ? 3 : 1;
    const recommendation: Schemas['Recommendation'] = {
      model_params: params,
      dataset_tokens_est: tokens,
      recommended: {
        turns: 1,
        lr,
        cycles: 1,
        steps_per_cycle: Math.max(10, Math.min(10_000, Math.ceil(tokens / 4096))),
        seq_len: 2048,
        lora_rank: params < 1e9 ? 8 : 16,
        batch_size: 4,
        num_epochs: epochs,
      },
      windows: { lr: { min: lr / 4, max: lr * 2 }, num_epochs: { min: 1, max: epochs * 2 } },
      notes: ['Learning rate scales down with model size.', 'Fewer epochs for larger datasets.'],
      disclaimer: 'These are starting points; watch the eval loss.',
    };
    return response(200).json(recommendation);
  });

  router.get('/v1/training/stats', 'getTrainingStats', ({ response }) => {
    const jobs = [...state.trainingJobs.values()];
    const distillations = [...state.distillationJobs.values()];
    const byStatus: Record<string, number> = {};
    const byType: Record<string, number> = {};
    for (const job of [...jobs, ...distillations]) byStatus[job.status] = (byStatus[job.status] ?? 0) + 1;
    for (const job of jobs) byType[job.type] = (byType[job.type] ?? 0) + 1;
    if (distillations.length) byType.distill = distillations.length;
    const results = [...state.results.values()];
    return response(200).json({
      total_jobs: jobs.length + distillations.length,
      by_status: byStatus,
      by_type: byType,
      total_gpu_seconds: results.reduce((sum, r) => sum + (r.gpu_seconds ?? 0), 0),
      total_tokens: results.reduce((sum, r) => sum + (r.tokens_processed ?? 0), 0),
      total_cost_usd: Math.round(state.budget.spent_usd * 1e6) / 1e6,
      adapters: state.adapters.size,
      models: state.models.size,
      datasets: state.datasets.size,
    });
  });

  router.get('/v1/training/status', 'getTrainingStatus', ({ response }) => {
    const all = [...state.trainingJobs.values(), ...state.distillationJobs.values()];
    const count = (status: string) => all.filter((j) => j.status === status).length;
    return response(200).json({
      running_jobs: count('running'),
      queued_jobs: count('pending'),
      completed_jobs: count('completed'),
      failed_jobs: count('failed'),
      model_count: state.models.size,
      dataset_count: state.datasets.size,
      runtime_available: state.workersOnline > 0,
      workers_online: state.workersOnline,
      // the first mock worker runs every running job; the others idle
      workers: Array.from({ length: state.workersOnline }, (_, i) => {
        const running = i === 0 ? all.filter((j) => j.status === 'running') : [];
        return {
          worker_id: `worker-${i + 1}`,
          device: 'cuda',
          job_types: ['finetune', 'train', 'contract', 'merge', 'benchmark', 'distill'],
          methods: null,
          last_seen_at: new Date().toISOString(),
          busy: running.length > 0,
          running_jobs: running.map((j) => ({
            job_id: j.id,
            kind: 'type' in j ? ('training' as const) : ('distillation' as const),
            type: 'type' in j ? j.type : 'distill',
            method: 'method' in j ? (j.method ?? null) : null,
            phase: 'phase' in j ? j.phase : 'training',
            current_step: 'current_step' in j ? j.current_step : 0,
            total_steps: 'total_steps' in j ? j.total_steps : null,
            started_at: j.started_at ?? null,
          })),
          other_running_jobs: 0,
        };
      }),
      // the mock answers chat completions itself: no serving worker stands behind them
      serving_workers: [],
    });
  });

  router.get('/v1/training/auto/config', 'getAutoTrainingConfig', ({ response }) =>
    response(200).json(state.autoConfig),
  );

  router.put('/v1/training/auto/config', 'updateAutoTrainingConfig', async ({ request, response }) => {
    const body = await request.json().catch(badJson);
    Object.assign(state.autoConfig, body);
    return response(200).json({ ok: true, config: state.autoConfig });
  });
}

function modelParams(
  state: MockState,
  id: string | undefined,
  name: string | undefined,
  params: number | undefined,
): number {
  if (params) return params;
  const entry = [...state.baseModels.values()].find(
    (m) => m.id === id || (name !== undefined && m.name === name),
  );
  if (id && !entry) throw notFound('base model', id, 'base_model_id');
  if (name && !entry) throw notFound('base model', name, 'base_model');
  if (!entry)
    throw new MockHttpError(400, 'invalid_request', 'Give base_model, base_model_id or params.', 'params');
  return entry.params ?? 4_600_000;
}

function datasetTokensOf(state: MockState, id: string | undefined): number | undefined {
  if (!id) return undefined;
  const found = state.datasets.get(id);
  if (!found) throw notFound('dataset', id, 'dataset_id');
  return found.tokens_est ?? Math.ceil(found.size_bytes / 4);
}
