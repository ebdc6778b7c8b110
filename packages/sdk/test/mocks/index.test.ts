import { describe, expect, it } from 'vitest';
import { AuthenticationError, RateLimitError, type TrainingJob } from '../../src/index.js';
import { createTuneryMock, mockHandler } from '../../src/mocks/index.js';
import { useMockServer } from '../helpers.js';
import { loadSpec, operationsOf } from '../spec.js';

const { mock, server, client } = useMockServer({ apiKey: 'tk_test', workerToken: 'tw_test' });
const finetune = { base_model: 'tiny-llama', train_texts: ['a'] };

describe('createTuneryMock', () => {
  it('has one handler per operation of the spec, on the same method and path', () => {
    const spec = operationsOf(loadSpec()).map((op) => `${op.operationId} ${op.method} ${op.path}`);
    const routes = createTuneryMock().routes.map((r) => `${r.operationId} ${r.method} ${r.path}`);
    expect(routes.sort()).toEqual(spec.sort());
  });

  it('checks the API key when given one', async () => {
    await expect(client({ apiKey: 'tk_wrong' }).budget.get()).rejects.toBeInstanceOf(AuthenticationError);
    await expect(client().budget.get()).resolves.toBeDefined();
    await expect(client({ apiKey: null }).health()).resolves.toEqual({ status: 'ok', database: 'pglite' });
    const claim = await fetch('http://tunery.test/v1/workers/claim', {
      method: 'POST',
      headers: { Authorization: 'Bearer tk_test', 'Content-Type': 'application/json' },
      body: JSON.stringify({ worker_id: 'w', capabilities: { job_types: ['finetune'], device: 'cpu' } }),
    });
    expect(claim.status).toBe(401);
  });

  it('failNext queues errors with headers, a count, and network failures', async () => {
    mock.failNext('getBudget', 429, { headers: { 'Retry-After': '0' }, times: 2, message: 'Slow down.' });
    const tunery = client({ maxRetries: 1 });
    const error = await tunery.budget.get().catch((e: unknown) => e);
    expect(error).toBeInstanceOf(RateLimitError);
    expect(error).toMatchObject({ code: 'rate_limited', message: '429 rate_limited: Slow down.' });
    expect((error as RateLimitError).headers?.get('retry-after')).toBe('0');
    await expect(tunery.budget.get()).resolves.toBeDefined();
    mock.failNext('getBudget', 'network');
    await expect(client({ maxRetries: 0 }).budget.get()).rejects.toMatchObject({
      name: 'APIConnectionError',
    });
  });

  it('records requests, and reset() forgets everything', async () => {
    await client().training.jobs.create(finetune);
    expect(mock.state.requests.map((r) => r.operationId)).toEqual(['createTrainingJob']);
    expect(mock.state.trainingJobs.size).toBe(1);
    mock.failNext('getBudget', 500);
    mock.reset();
    expect(mock.state.trainingJobs.size).toBe(0);
    expect(mock.state.requests).toEqual([]);
    await expect(client().budget.get()).resolves.toBeDefined();
  });

  it('advanceJob moves a training job by status, phase or step', async () => {
    const job = await client().training.jobs.create({ ...finetune, training_config: { max_steps: 40 } });
    expect(mock.advanceJob(job.id, 'running')).toMatchObject({
      status: 'running',
      phase: 'training',
      attempt: 1,
    });
    expect(mock.advanceJob(job.id, { step: 10 })).toMatchObject({ current_step: 10, progress: 25 });
    expect(mock.advanceJob(job.id, 'evaluating')).toMatchObject({ status: 'running', phase: 'evaluating' });
    expect(mock.advanceJob(job.id, 'completed')).toMatchObject({
      status: 'completed',
      phase: 'done',
      current_step: 40,
    });
    expect(() => mock.advanceJob('job_nope', 'running')).toThrow(/no job job_nope/);
  });

  it('tickJob moves a default job to completion in four ticks', async () => {
    const job = await client().training.jobs.create(finetune);
    const statuses = [1, 2, 3, 4].map(() => {
      const j = mock.tickJob(job.id) as TrainingJob;
      return `${j.status}:${j.current_step}`;
    });
    expect(statuses).toEqual(['running:0', 'running:20', 'running:40', 'completed:60']);
  });

  it('honours the body idempotency_key over the header', async () => {
    const tunery = client();
    const a = await tunery.training.jobs.create({ ...finetune, idempotency_key: 'k1' });
    const b = await tunery.training.jobs.create({ ...finetune, idempotency_key: 'k1' });
    expect(b.id).toBe(a.id);
    expect(mock.state.trainingJobs.size).toBe(1);
  });
});

describe('mockHandler', () => {
  it('overrides one operation with a typed answer, path parameters by name', async () => {
    const created = await client().training.jobs.create(finetune);
    server.use(
      mockHandler(
        'getTrainingJob',
        ({ params }) => ({
          ...created,
          id: params.job_id!,
          status: 'failed',
          error: { code: 'out_of_memory', message: 'm' },
        }),
        { baseURL: 'http://tunery.test' },
      ),
    );
    const job = await client().training.jobs.retrieve(created.id);
    expect(job).toMatchObject({ id: created.id, status: 'failed', error: { code: 'out_of_memory' } });
    // the other operations still answer from the mock's state
    expect((await client().training.jobs.list()).data.map((j) => j.id)).toEqual([created.id]);
  });

  it('sends a Response as it is, so a test can answer an error', async () => {
    server.use(
      mockHandler(
        'getBudget',
        () =>
          Response.json({ error: { code: 'internal_error', message: 'x', param: null } }, { status: 500 }),
        {
          baseURL: 'http://tunery.test',
        },
      ),
    );
    await expect(client({ maxRetries: 0 }).budget.get()).rejects.toMatchObject({
      status: 500,
      code: 'internal_error',
    });
  });

  it('refuses, at compile time, a body of the wrong shape', () => {
    // @ts-expect-error: a budget has no `status`
    mockHandler('getBudget', () => ({ status: 'ok' }));
    expect(() => mockHandler('noSuchOperation' as 'getBudget', () => new Response())).toThrow(
      /noSuchOperation/,
    );
  });
});
