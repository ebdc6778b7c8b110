import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { newId } from '../src/ids.js';
import { enqueueJob } from '../src/queue/enqueue.js';
import { estimate, loraTrainableParams, modelShape, recommend } from '../src/services/estimate.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

const base = {
  method: 'lora' as const,
  batchSize: 4,
  maxSeqLength: 2048,
  loraRank: 16,
  numEpochs: 3,
  datasetTokens: 1_000_000,
  useGradientCheckpointing: false,
  gpuTflops: 312,
  gpuMemoryGb: 80,
  mfu: 0.35,
  numGpus: 1,
  pricePerGpuHour: 2,
};

describe('estimate arithmetic', () => {
  it('infers a Llama-like shape from the parameter count', () => {
    expect(modelShape(7e9)).toEqual({ layers: 33, hidden: 4224 });
    expect(modelShape(1.2e9)).toEqual({ layers: 18, hidden: 2304 });
    expect(loraTrainableParams(7e9, 16)).toBe(18 * 16 * 4224 * 33);
  });

  it('counts 16 bytes a parameter for a full fine-tune, 2 for a frozen LoRA base, ~0.55 for QLoRA', () => {
    const full = estimate({ ...base, params: 1e9, method: 'full' });
    expect(full.memory_gb).toMatchObject({ weights: 4, gradients: 4, optimizer: 8 });
    expect(full.trainable_params).toBe(1e9);
    const lora = estimate({ ...base, params: 1e9 });
    expect(lora.memory_gb.weights).toBeGreaterThanOrEqual(2);
    expect(lora.memory_gb.weights).toBeLessThan(2.1);
    expect(lora.memory_gb.optimizer).toBeLessThan(0.5);
    const qlora = estimate({ ...base, params: 1e9, method: 'qlora' });
    expect(qlora.memory_gb.weights).toBeLessThan(0.7);
    const sum =
      full.memory_gb.weights +
      full.memory_gb.gradients +
      full.memory_gb.optimizer +
      full.memory_gb.activations;
    expect(full.memory_gb.total).toBeCloseTo(sum * 1.1, 1);
  });

  it('shrinks activations with gradient checkpointing and derives time from 6N / 4N FLOPs', () => {
    const plain = estimate({ ...base, params: 7e9, method: 'full' });
    const checkpointed = estimate({ ...base, params: 7e9, method: 'full', useGradientCheckpointing: true });
    expect(checkpointed.memory_gb.activations).toBeLessThan(plain.memory_gb.activations / 5);
    expect(plain.fits).toBe(false);
    // 6 · 7e9 · 3e6 tokens / (312e12 · 0.35) s
    expect(plain.total_tokens).toBe(3_000_000);
    expect(plain.estimated_seconds).toBeCloseTo((6 * 7e9 * 3e6) / (312e12 * 0.35), 0);
    const lora = estimate({ ...base, params: 7e9 });
    expect(lora.estimated_seconds / plain.estimated_seconds).toBeCloseTo(4 / 6, 2);
    expect(plain.estimated_cost_usd).toBeCloseTo((plain.estimated_seconds / 3600) * 2, 3);
    expect(plain.total_steps).toBe(Math.ceil(3e6 / (4 * 2048)));
    const steps = estimate({ ...base, params: 7e9, maxSteps: 100, numGpus: 2 });
    expect(steps).toMatchObject({ total_steps: 100, total_tokens: 100 * 4 * 2048 * 2 });
  });

  it('reproduces seed 002’s recommendation for a 7B model and 2.1M tokens', () => {
    const rec = recommend({ params: 7e9, datasetTokens: 2_100_000 });
    expect(rec).toMatchObject({
      model_params: 7e9,
      dataset_tokens_est: 2_100_000,
      recommended: {
        turns: 2,
        lr: 7e-5,
        cycles: 6,
        steps_per_cycle: 1000,
        seq_len: 256,
        lora_rank: 32,
        batch_size: 4,
        num_epochs: 3,
      },
      windows: { lr: { min: 3.5e-5, max: 1.4e-4 }, cycles: { min: 3, max: 10 } },
    });
    expect(rec.notes[0]).toMatch(/^≈3 epochs over your ~2.1M-token dataset/);
    expect(rec.notes[1]).toMatch(/~7B model/);
    // Smaller models learn faster; more data trains longer.
    expect(recommend({ params: 1e9, datasetTokens: 2_100_000 }).recommended.lr).toBeGreaterThan(7e-5);
    expect(recommend({ params: 7e9, datasetTokens: 21_000_000 }).recommended.cycles).toBeGreaterThan(6);
  });
});

describe.each(DATABASES)('planning on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(async () => {
    await server?.stop();
  });

  const post = (path: string, json: unknown, key?: string) => server.api(path, { method: 'POST', json, key });

  it('estimates from a catalog name, a hub id in the catalog, or params', async () => {
    const byName = await post('/v1/training/estimate', {
      base_model: 'qwen2.5-7b-instruct',
      dataset_tokens: 1_000_000,
    });
    expect(byName.status).toBe(200);
    const estimateBody = await byName.json();
    expect(estimateBody).toMatchObject({ params: 7_615_616_512, method: 'lora', total_tokens: 3_000_000 });
    expect(estimateBody.assumptions.length).toBeGreaterThan(3);
    const byHubId = await (
      await post('/v1/training/estimate', {
        base_model: 'Qwen/Qwen2.5-7B-Instruct',
        dataset_tokens: 1_000_000,
      })
    ).json();
    expect(byHubId).toEqual(estimateBody);
    const byId = await (
      await post('/v1/training/estimate', {
        base_model_id: 'bm_qwen2_5-7b-instruct',
        dataset_tokens: 1_000_000,
      })
    ).json();
    expect(byId.params).toBe(7_615_616_512);
    const byParams = await (
      await post('/v1/training/estimate', {
        params: 1_000_000,
        max_steps: 10,
        method: 'full',
        batch_size: 1,
        max_seq_length: 128,
        gpu_memory_gb: 1,
      })
    ).json();
    expect(byParams).toMatchObject({ params: 1_000_000, total_steps: 10, fits: true });
  });

  it('estimates from a stored dataset', async () => {
    const ds = await (await post('/v1/datasets', { train_texts: ['x'.repeat(4000)] })).json();
    const res = await (
      await post('/v1/training/estimate', { params: 1e8, dataset_id: ds.id, num_epochs: 1 })
    ).json();
    expect(res.total_tokens).toBe(ds.tokens_est);
    const other = await post('/v1/training/estimate', { params: 1e8, dataset_id: ds.id }, server.otherKey);
    expect(other.status).toBe(404);
  });

  it('refuses estimates without a model or data', async () => {
    const noModel = await post('/v1/training/estimate', { dataset_tokens: 10 });
    expect((await noModel.json()).error).toMatchObject({ code: 'invalid_config', param: 'base_model' });
    const unknownSize = await post('/v1/training/estimate', {
      base_model: 'someorg/unknown-model',
      dataset_tokens: 10,
    });
    expect((await unknownSize.json()).error).toMatchObject({ code: 'invalid_config', param: 'params' });
    const unknownModel = await post('/v1/training/estimate', {
      base_model: 'no such model',
      dataset_tokens: 10,
    });
    expect((await unknownModel.json()).error).toMatchObject({ code: 'invalid_config', param: 'base_model' });
    const noData = await post('/v1/training/estimate', { params: 1000 });
    expect((await noData.json()).error).toMatchObject({ code: 'invalid_config', param: 'dataset_tokens' });
    const badEnum = await post('/v1/training/estimate', {
      params: 1000,
      dataset_tokens: 10,
      method: 'magic',
    });
    expect((await badEnum.json()).error).toMatchObject({ code: 'invalid_request', param: 'method' });
    const badRange = await post('/v1/training/estimate', { params: 1000, dataset_tokens: 10, mfu: 2 });
    expect((await badRange.json()).error).toMatchObject({ code: 'invalid_request', param: 'mfu' });
    const badType = await post('/v1/training/estimate', { params: 'seven billion', dataset_tokens: 10 });
    expect((await badType.json()).error).toMatchObject({ code: 'invalid_request', param: 'params' });
    const missingId = await post('/v1/training/estimate', { base_model_id: 'bm_nope', dataset_tokens: 10 });
    expect(missingId.status).toBe(404);
  });

  it('recommends from ids or sizes', async () => {
    const bySize = await (
      await post('/v1/training/recommend', { params: 7_000_000_000, dataset_bytes: 8_400_000 })
    ).json();
    expect(bySize).toMatchObject({
      model_params: 7e9,
      dataset_tokens_est: 2_100_000,
      recommended: { lr: 7e-5, cycles: 6 },
    });
    expect(bySize.disclaimer).toMatch(/starting points/);

    const ds = await (await post('/v1/datasets', { train_texts: ['hello there'] })).json();
    const byIds = await (
      await post('/v1/training/recommend', { base_model_id: 'bm_llama-3_2-1b', dataset_id: ds.id })
    ).json();
    expect(byIds).toMatchObject({ model_params: 1_235_814_400, dataset_tokens_est: ds.tokens_est });
    expect(byIds.windows.seq_len.max).toBe(2048);

    const nothing = await post('/v1/training/recommend', {});
    expect(nothing.status).toBe(400);
    expect((await nothing.json()).error.code).toBe('invalid_config');
    const noData = await post('/v1/training/recommend', { params: 1000 });
    expect((await noData.json()).error).toMatchObject({ code: 'invalid_config', param: 'dataset_tokens' });
    const badRange = await post('/v1/training/recommend', { params: 0, dataset_tokens: 5 });
    expect((await badRange.json()).error).toMatchObject({ code: 'invalid_request', param: 'params' });
  });

  it('counts jobs, compute and cost per tenant', async () => {
    const add = async (
      tenantId: string,
      type: string,
      status: string,
      results: Record<string, unknown>,
      cost: number,
    ) => {
      const id = newId('job');
      await enqueueJob(server.ctx, server.ctx.knex, {
        id,
        tenantId,
        kind: type === 'distill' ? 'distillation' : 'training',
        type,
        config: {},
      });
      await server.ctx
        .knex('jobs')
        .where({ id })
        .update({ status, results: JSON.stringify(results), cost_accrued: cost });
    };
    await add('default', 'finetune', 'completed', { gpu_seconds: 100.5, tokens_processed: 2000 }, 1.25);
    await add('default', 'distill', 'completed', { gpu_seconds: 20, tokens_processed: 500 }, 0.5);
    await add('default', 'finetune', 'failed', { gpu_seconds: 999 }, 0.25);
    await add('default', 'merge', 'running', {}, 0);
    await add('other-tenant', 'finetune', 'completed', { gpu_seconds: 7 }, 9);

    const stats = await (await server.api('/v1/training/stats')).json();
    expect(stats).toMatchObject({
      total_jobs: 4,
      by_status: { pending: 0, running: 1, completed: 2, failed: 1, cancelled: 0 },
      by_type: { finetune: 2, distill: 1, merge: 1 },
      total_gpu_seconds: 120.5,
      total_tokens: 2500,
      total_cost_usd: 2,
    });

    await server.ctx.knex('workers').insert([
      { id: 'w-fresh', capabilities: JSON.stringify({ job_types: ['finetune'], device: 'cpu' }) },
      {
        id: 'w-stale',
        capabilities: JSON.stringify({ job_types: ['finetune'], device: 'cpu' }),
        last_seen_at: new Date(Date.now() - 120_000),
      },
    ]);
    const status = await (await server.api('/v1/training/status')).json();
    expect(status).toMatchObject({
      running_jobs: 1,
      queued_jobs: 0,
      completed_jobs: 2,
      failed_jobs: 1,
      runtime_available: true,
      workers_online: 1,
    });
    expect(status.dataset_count).toBeGreaterThanOrEqual(1);
    const theirs = await (await server.api('/v1/training/stats', { key: server.otherKey })).json();
    expect(theirs).toMatchObject({ total_jobs: 1, total_cost_usd: 9 });
  });
});
