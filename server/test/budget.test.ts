import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createKey } from '../src/auth.js';
import { newId } from '../src/ids.js';
import { enqueueJob } from '../src/queue/enqueue.js';
import { assertWithinBudget } from '../src/services/budget.js';
import { DEFAULT_PARAMS, estimateJobCostUsd, TEACHER_USD_PER_TOKEN } from '../src/services/estimate.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

describe('job cost estimates', () => {
  const ctx = { config: { pricePerGpuHour: 2 } } as Parameters<typeof estimateJobCostUsd>[0];

  it('prices compute at the reference GPU and teacher tokens per token', () => {
    // 4 · 1e9 · 1e6 FLOPs / (312e12 · 0.35) s → hours · $2
    const lora = estimateJobCostUsd(ctx, { params: 1e9, method: 'lora', totalTokens: 1e6 });
    expect(lora).toBeCloseTo(((4 * 1e9 * 1e6) / (312e12 * 0.35) / 3600) * 2, 6);
    const full = estimateJobCostUsd(ctx, { params: 1e9, method: 'full', totalTokens: 1e6 });
    expect(full / lora).toBeCloseTo(1.5, 3);
    const unknown = estimateJobCostUsd(ctx, { params: null, method: 'lora', totalTokens: 1e6 });
    expect(unknown).toBeCloseTo(
      estimateJobCostUsd(ctx, { params: DEFAULT_PARAMS, method: 'lora', totalTokens: 1e6 }),
      9,
    );
    const distill = estimateJobCostUsd(ctx, {
      params: 1e9,
      method: 'lora',
      totalTokens: 1e6,
      teacherTokens: 100_000,
    });
    expect(distill - lora).toBeCloseTo(100_000 * TEACHER_USD_PER_TOKEN, 6);
  });
});

describe.each(DATABASES)('budget on %s', (db) => {
  let server: TestServer;
  let plainKey: string;
  beforeAll(async () => {
    server = await startTestServer(db);
    plainKey = await createKey(server.ctx.knex, { kind: 'user', tenantId: 'default' });
  });
  afterAll(async () => {
    await server?.stop();
  });

  const put = (json: unknown, key?: string) => server.api('/v1/budget', { method: 'PUT', json, key });

  it('is unlimited until an admin sets a limit', async () => {
    expect(await (await server.api('/v1/budget')).json()).toEqual({
      tenant_id: 'default',
      limit_usd: null,
      spent_usd: 0,
      remaining_usd: null,
    });
    const res = await put({ limit_usd: 10 });
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({
      tenant_id: 'default',
      limit_usd: 10,
      spent_usd: 0,
      remaining_usd: 10,
    });

    const denied = await put({ limit_usd: 1000 }, plainKey);
    expect(denied.status).toBe(403);
    expect((await denied.json()).error.code).toBe('permission_denied');
    expect((await (await server.api('/v1/budget', { key: plainKey })).json()).limit_usd).toBe(10);
  });

  it('refuses bad limits', async () => {
    const negative = await put({ limit_usd: -1 });
    expect((await negative.json()).error).toMatchObject({ code: 'invalid_request', param: 'limit_usd' });
    const missing = await put({});
    expect((await missing.json()).error).toMatchObject({ code: 'invalid_request', param: 'limit_usd' });
    const wrongType = await put({ limit_usd: 'lots' });
    expect(wrongType.status).toBe(400);
  });

  it('subtracts what jobs accrued, and refuses work beyond the rest with 402', async () => {
    const id = newId('job');
    await enqueueJob(server.ctx, server.ctx.knex, {
      id,
      tenantId: 'default',
      kind: 'training',
      type: 'finetune',
      config: {},
    });
    await server.ctx.knex('jobs').where({ id }).update({ cost_accrued: 7.5 });
    expect(await (await server.api('/v1/budget')).json()).toMatchObject({
      limit_usd: 10,
      spent_usd: 7.5,
      remaining_usd: 2.5,
    });
    // Another tenant's spending is its own.
    expect((await (await server.api('/v1/budget', { key: server.otherKey })).json()).spent_usd).toBe(0);

    await expect(assertWithinBudget(server.ctx, 'default', 2.5)).resolves.toBeUndefined();
    await expect(assertWithinBudget(server.ctx, 'default', 2.51)).rejects.toMatchObject({
      status: 402,
      code: 'insufficient_credits',
      message: 'Estimated cost $2.51 exceeds the $2.50 left in your budget.',
    });
    await expect(assertWithinBudget(server.ctx, 'other-tenant', 1e9)).resolves.toBeUndefined();

    // Through the API: a benchmark costs more than nothing, so a spent budget refuses it.
    await server.ctx
      .knex('models')
      .insert({ id: 'model_budget', tenant_id: 'default', job_id: id, name: 'm', kind: 'full' });
    const ds = await (
      await server.api('/v1/datasets', { method: 'POST', json: { train_texts: ['eval'] } })
    ).json();
    await put({ limit_usd: 7.5 });
    const refused = await server.api('/v1/models/model_budget/benchmark', {
      method: 'POST',
      json: { dataset_id: ds.id },
    });
    expect(refused.status).toBe(402);
    expect((await refused.json()).error.code).toBe('insufficient_credits');
    await put({ limit_usd: null });
    const allowed = await server.api('/v1/models/model_budget/benchmark', {
      method: 'POST',
      json: { dataset_id: ds.id },
    });
    expect(allowed.status).toBe(202);
  });
});
