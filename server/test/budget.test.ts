import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createKey } from '../src/auth.js';
import { teacherPricesEnv } from '../src/config.js';
import { newId } from '../src/ids.js';
import { enqueueJob } from '../src/queue/enqueue.js';
import { MIN_RESERVATION_USD, reservableUsd, reserveBudget } from '../src/services/budget.js';
import { DEFAULT_PARAMS, estimateJobCostUsd, teacherUsdPerMillionTokens } from '../src/services/estimate.js';
import type { TrainingJobCreate } from '../src/services/training-request.js';
import { planTrainingJob } from '../src/services/training-request.js';
import { fakeWorker } from './fake-worker.js';
import { completedJob } from './fixtures.js';
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
      teacherUsdPerMillionTokens: 10,
    });
    expect(distill - lora).toBeCloseTo(1, 6);
  });

  it('prices teachers per model from TUNERY_TEACHER_PRICES, `*` for the rest, local ones at 0', () => {
    const teacherPrices = teacherPricesEnv('openai/gpt-4o=2.5, *=10,groq/llama=0');
    expect(teacherPrices).toEqual({ 'openai/gpt-4o': 2.5, '*': 10, 'groq/llama': 0 });
    const priced = { config: { ...ctx.config, teacherPrices } };
    expect(teacherUsdPerMillionTokens(priced, 'openai/gpt-4o', 'openai')).toBe(2.5);
    expect(teacherUsdPerMillionTokens(priced, 'openai/o3', 'openai')).toBe(10);
    expect(teacherUsdPerMillionTokens(priced, 'groq/llama', 'openai')).toBe(0);
    expect(teacherUsdPerMillionTokens(priced, 'local/qwen', 'local')).toBe(0);
    expect(teacherPricesEnv()).toEqual({ '*': 10 });
    for (const bad of ['gpt-4o', '=3', 'gpt-4o=', 'gpt-4o=-1', 'gpt-4o=abc'])
      expect(() => teacherPricesEnv(bad)).toThrow(/TUNERY_TEACHER_PRICES/);
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

    const reserve = (tenantId: string, usd: number) =>
      server.ctx.knex.transaction((trx) => reserveBudget(trx, tenantId, usd));
    await expect(reserve('default', 2.5)).resolves.toBeUndefined();
    await expect(reserve('default', 2.51)).rejects.toMatchObject({
      status: 402,
      code: 'insufficient_credits',
      message: 'Estimated cost $2.51 exceeds the $2.50 left in your budget.',
    });
    await expect(reserve('other-tenant', 1e9)).resolves.toBeUndefined();

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

describe.each(DATABASES)('budget reservations on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(async () => {
    await server?.stop();
  });
  // Each test claims the job it made: nothing an earlier test left pending may be handed out first.
  beforeEach(async () => {
    await server.ctx.knex('jobs').where({ status: 'pending' }).update({ status: 'cancelled' });
  });

  /** A tenant of its own with a user key, so each test starts from zero spending. */
  async function tenantWithLimit(limitUsd: number | null) {
    const tenantId = newId('job').replace('job_', 't_');
    await server.ctx.knex('tenants').insert({ id: tenantId, budget_limit_usd: limitUsd });
    return { tenantId, key: await createKey(server.ctx.knex, { kind: 'user', tenantId }) };
  }
  const body = {
    base_model: 'llama-3.1-8b',
    train_texts: ['a'.repeat(1000)],
    max_steps: 2000,
    batch_size: 8,
  };
  const create = (key: string) => server.api('/v1/training/jobs', { method: 'POST', json: body, key });
  const budgetOf = async (key: string) => (await server.api('/v1/budget', { key })).json();
  const estimateFor = async (tenantId: string) =>
    reservableUsd(
      (await planTrainingJob(server.ctx, tenantId, body as TrainingJobCreate)).estimatedUsd,
      server.ctx.config.pricePerGpuHour,
    );

  it('concurrent creates that together exceed the limit: only those that fit pass', async () => {
    const probe = await tenantWithLimit(null);
    const each = await estimateFor(probe.tenantId);
    expect(each).toBeGreaterThan(0.01);
    // Room for three jobs and half of a fourth.
    const limit = Number((each * 3.5).toFixed(4));
    const { key } = await tenantWithLimit(limit);

    const answers = await Promise.all(Array.from({ length: 6 }, () => create(key)));
    const statuses = answers.map((r) => r.status).sort();
    expect(statuses).toEqual([201, 201, 201, 402, 402, 402]);
    for (const refused of answers.filter((r) => r.status === 402)) {
      expect((await refused.json()).error.code).toBe('insufficient_credits');
    }
    const created = await Promise.all(answers.filter((r) => r.status === 201).map((r) => r.json()));
    // The three pending jobs hold their estimates: only the half job is left.
    expect(await budgetOf(key)).toMatchObject({
      spent_usd: 0,
      remaining_usd: Number((limit - 3 * each).toFixed(4)),
    });

    // Cancelling a pending job releases its whole reservation.
    await server.api(`/v1/training/jobs/${created[0].id}/cancel`, { method: 'POST', key });
    expect((await budgetOf(key)).remaining_usd).toBeCloseTo(limit - 2 * each, 4);
    expect((await create(key)).status).toBe(201);
    expect((await create(key)).status).toBe(402);
  });

  it('a job estimated at nothing (a merge) still needs something left: refused 402 once the budget is spent', async () => {
    const { tenantId, key } = await tenantWithLimit(5);
    const { jobId } = await completedJob(server, { tenantId });
    await server.ctx.knex('jobs').where({ id: jobId }).update({ cost_accrued: 5 });
    const merge = () =>
      server.api('/v1/training/jobs', { method: 'POST', json: { type: 'merge', parent_job_id: jobId }, key });
    const refused = await merge();
    expect(refused.status).toBe(402);
    expect((await refused.json()).error.code).toBe('insufficient_credits');
    const mergeRoute = await server.api(`/v1/training/jobs/${jobId}/merge`, {
      method: 'POST',
      json: {},
      key,
    });
    expect(mergeRoute.status).toBe(402);
    expect(await server.ctx.knex('jobs').where({ tenant_id: tenantId, type: 'merge' })).toEqual([]);

    await server.ctx.knex('tenants').where({ id: tenantId }).update({ budget_limit_usd: 6 });
    const created = await merge();
    expect(created.status).toBe(201);
    const row = await server.ctx
      .knex('jobs')
      .where({ id: (await created.json()).id })
      .first('cost_reserved');
    expect(Number(row.cost_reserved)).toBe(MIN_RESERVATION_USD);
  });

  it('where worker time is free (0 per GPU-hour), a job estimated at nothing holds nothing', async () => {
    const { tenantId, key } = await tenantWithLimit(5);
    const { jobId } = await completedJob(server, { tenantId });
    await server.ctx.knex('jobs').where({ id: jobId }).update({ cost_accrued: 5 });
    const { config } = server.ctx;
    const price = config.pricePerGpuHour;
    config.pricePerGpuHour = 0;
    try {
      const created = await server.api('/v1/training/jobs', {
        method: 'POST',
        json: { type: 'merge', parent_job_id: jobId },
        key,
      });
      expect(created.status).toBe(201);
      const row = await server.ctx
        .knex('jobs')
        .where({ id: (await created.json()).id })
        .first('cost_reserved');
      expect(Number(row.cost_reserved)).toBe(0);
    } finally {
      config.pricePerGpuHour = price;
    }
  });

  it('a finished job keeps only what it accrued: the rest of its estimate is released', async () => {
    const { tenantId, key } = await tenantWithLimit(1000);
    const each = await estimateFor(tenantId);
    const created = await (await create(key)).json();
    expect((await budgetOf(key)).remaining_usd).toBeCloseTo(1000 - each, 4);
    const worker = fakeWorker(server);
    const job = (await worker.claim())!;
    expect(job.job_id).toBe(created.id);
    // While running, what it accrued counts once (the reservation shrinks by as much).
    await server.ctx.knex('jobs').where({ id: job.job_id }).update({ cost_accrued: 0.25 });
    expect(await budgetOf(key)).toMatchObject({
      spent_usd: 0.25,
      remaining_usd: Number((1000 - each).toFixed(4)),
    });
    expect((await worker.complete(job.job_id, job.lease_token)).status).toBe(200);
    const after = await budgetOf(key);
    expect(after.spent_usd).toBeGreaterThanOrEqual(0.25);
    expect(after.remaining_usd).toBeCloseTo(1000 - after.spent_usd, 4);
  });

  it('a running job whose spending crosses the limit is stopped with insufficient_credits; checkpoints stay', async () => {
    const { tenantId, key } = await tenantWithLimit(1000);
    const created = await (await create(key)).json();
    const worker = fakeWorker(server);
    const job = (await worker.claim())!;
    expect(job.job_id).toBe(created.id);
    const ckpt = await worker.upload(
      job.job_id,
      job.lease_token,
      'checkpoints',
      'checkpoint-5',
      Buffer.from('c'),
      5,
    );
    expect(ckpt.status).toBe(201);
    expect((await worker.heartbeat(job.job_id, job.lease_token)).status).toBe(200);

    // The owner lowers the limit below what the job has accrued.
    await server.ctx.knex('jobs').where({ id: job.job_id }).update({ cost_accrued: 2 });
    await server.ctx.knex('tenants').where({ id: tenantId }).update({ budget_limit_usd: 1.5 });
    const stopped = await worker.heartbeat(job.job_id, job.lease_token);
    expect(stopped.status).toBe(409);
    expect((await stopped.json()).error.code).toBe('lease_lost');
    // Every later write of the attempt is refused.
    expect((await worker.heartbeat(job.job_id, job.lease_token)).status).toBe(409);

    const row = await (await server.api(`/v1/training/jobs/${job.job_id}`, { key })).json();
    expect(row).toMatchObject({ status: 'failed', error: { code: 'insufficient_credits' } });
    const events = await server.ctx.knex('job_events').where({ job_id: job.job_id }).orderBy('seq');
    expect(events.at(-1)).toMatchObject({ kind: 'failed' });
    expect(events.at(-1).payload.error.code).toBe('insufficient_credits');
    const checkpoints = await (
      await server.api(`/v1/training/jobs/${job.job_id}/checkpoints`, { key })
    ).json();
    expect(checkpoints.checkpoints.map((c: { name: string }) => c.name)).toEqual(['checkpoint-5']);

    // Resumed while the budget is spent, it would only be stopped again: refused.
    const refused = await server.api(`/v1/training/jobs/${job.job_id}/resume`, {
      method: 'POST',
      json: {},
      key,
    });
    expect(refused.status).toBe(402);
    expect((await refused.json()).error.code).toBe('insufficient_credits');
    // With the limit raised, it resumes from that checkpoint.
    await server.ctx.knex('tenants').where({ id: tenantId }).update({ budget_limit_usd: 1000 });
    expect(
      (await server.api(`/v1/training/jobs/${job.job_id}/resume`, { method: 'POST', json: {}, key })).status,
    ).toBe(200);
    const again = (await worker.claim())!;
    expect(again.resume_from).toMatchObject({ name: 'checkpoint-5', step: 5 });
  });
});
