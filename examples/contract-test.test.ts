// Contract-testing your own code against @tunery/sdk/mocks: no server, but every response is the
// shape the real server sends (the mocks are validated against the same OpenAPI document).
import { InternalServerError, Tunery } from '@tunery/sdk';
import { createTuneryMock } from '@tunery/sdk/mocks';
import { setupServer } from 'msw/node';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { submitNightlyFinetune } from './src/nightly.js';

const BASE_URL = 'http://tunery.test';
const mock = createTuneryMock({ baseURL: BASE_URL });
const server = setupServer(...mock.handlers);
beforeAll(() => server.listen({ onUnhandledRequest: 'error' }));
afterEach(() => mock.reset());
afterAll(() => server.close());

const client = (maxRetries = 2) =>
  new Tunery({ baseURL: BASE_URL, apiKey: 'tk_test', maxRetries, logLevel: 'off' });

async function recordTrajectories(n: number) {
  for (let i = 0; i < n; i++) {
    await client().trajectories.create({
      source: 'support-bot',
      llm_calls: [{ user_prompt: `question ${i}`, response: `answer ${i}` }],
    });
  }
}

describe('submitNightlyFinetune', () => {
  it('builds a dataset from the trajectories and submits a LoRA fine-tune on it', async () => {
    await recordTrajectories(3);
    const result = await submitNightlyFinetune(client(), { date: '2026-04-19' });
    expect(result.status).toBe('submitted');
    if (result.status !== 'submitted') return;
    expect(result.dataset).toMatchObject({ name: 'nightly-2026-04-19', format: 'chat', num_examples: 3 });
    expect(result.job).toMatchObject({ status: 'pending', method: 'lora', dataset_id: result.dataset.id });
    expect(result.job.config).toMatchObject({ output_name: 'nightly-2026-04-19' });
  });

  it('submits once however often it runs the same night', async () => {
    await recordTrajectories(1);
    const first = await submitNightlyFinetune(client(), { date: '2026-04-19' });
    const again = await submitNightlyFinetune(client(), { date: '2026-04-19' });
    expect(again).toEqual(first);
    expect(mock.state.trainingJobs.size).toBe(1);
    expect(mock.state.datasets.size).toBe(1);
  });

  it('skips a night without trajectories', async () => {
    expect(await submitNightlyFinetune(client(), { date: '2026-04-19' })).toEqual({
      status: 'skipped',
      reason: 'not_enough_trajectories',
    });
    expect(mock.state.requests.map((r) => r.operationId)).toEqual(['listTrajectories']);
  });

  it('skips when the budget is spent', async () => {
    await recordTrajectories(1);
    mock.state.budget.limit_usd = 0;
    expect(await submitNightlyFinetune(client(), { date: '2026-04-19' })).toEqual({
      status: 'skipped',
      reason: 'insufficient_credits',
    });
  });

  it('rides out a rate limit: the SDK retries the create with the same key', async () => {
    await recordTrajectories(1);
    mock.failNext('createTrainingJob', 429, { headers: { 'Retry-After': '0' } });
    const result = await submitNightlyFinetune(client(), { date: '2026-04-19' });
    expect(result.status).toBe('submitted');
    const keys = mock.state.requests
      .filter((r) => r.operationId === 'createTrainingJob')
      .map((r) => r.headers['idempotency-key']);
    expect(keys).toEqual(['nightly-job-2026-04-19', 'nightly-job-2026-04-19']);
  });

  it('lets a server failure through once retries are spent', async () => {
    await recordTrajectories(1);
    mock.failNext('buildDataset', 500);
    await expect(submitNightlyFinetune(client(0), { date: '2026-04-19' })).rejects.toBeInstanceOf(
      InternalServerError,
    );
  });
});
