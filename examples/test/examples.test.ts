// The runnable examples, run against the mock server. (Against a live server they take
// TUNERY_BASE_URL and TUNERY_API_KEY from the environment.)
import { Tunery } from '@tunery/sdk';
import { createTuneryMock } from '@tunery/sdk/mocks';
import { setupServer } from 'msw/node';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { main as distill } from '../distill.js';
import { main as quickstart } from '../quickstart.js';

const BASE_URL = 'http://tunery.test';
// Every poll moves a job one tick forward, as a worker would between polls.
const mock = createTuneryMock({ baseURL: BASE_URL, autoAdvance: true, stepsPerTick: 12 });
const server = setupServer(...mock.handlers);
beforeAll(() => server.listen({ onUnhandledRequest: 'error' }));
afterEach(() => mock.reset());
afterAll(() => server.close());

const client = () => new Tunery({ baseURL: BASE_URL, apiKey: 'tk_test', logLevel: 'off' });

describe('examples', () => {
  it('quickstart fine-tunes from inline texts and prints one progress line per change', async () => {
    const lines: string[] = [];
    const job = await quickstart({ client: client(), pollIntervalMs: 1, log: (line) => lines.push(line) });
    expect(job.status).toBe('completed');
    const progress = lines.slice(0, -1);
    expect(progress[0]).toBe('step 0/60 · loss –');
    for (const line of progress.slice(1)) expect(line).toMatch(/^step \d+\/60 · loss \d+\.\d{3}$/);
    expect(progress.at(-1)).toMatch(/^step 60\/60 · /);
    expect(new Set(progress).size).toBe(progress.length);
    expect(lines.at(-1)).toBe(`done: ${job.id} → adapter ${job.adapter_name}, model ${job.output_model_id}`);
  });

  it('distill runs a distillation job through its phases and prints the artifacts', async () => {
    const lines: string[] = [];
    const { job, artifacts } = await distill({
      client: client(),
      pollIntervalMs: 1,
      log: (line) => lines.push(line),
    });
    expect(job).toMatchObject({ status: 'completed', phase: 'done' });
    expect(lines.filter((l) => l.startsWith('phase ')).map((l) => l.split(' ')[1])).toEqual([
      'initializing',
      'data_generation',
      'curation',
      'training',
      'done',
    ]);
    expect(lines).toContain(`adapter: ${artifacts.adapter_path}`);
    expect(lines.some((l) => l.startsWith('adapter_model.safetensors ('))).toBe(true);
  });

  it('quickstart reports a failed job as an error', async () => {
    mock.state.budget.limit_usd = 0;
    await expect(quickstart({ client: client(), pollIntervalMs: 1, log: () => {} })).rejects.toMatchObject({
      code: 'insufficient_credits',
    });
  });
});
