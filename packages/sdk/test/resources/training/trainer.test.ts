import { describe, expect, it } from 'vitest';
import { ConflictError, NotFoundError, Trainer } from '../../../src/index.js';
import { BASE_URL, useMockServer } from '../../helpers.js';

const { mock, client } = useMockServer();

describe('Trainer', () => {
  it('works on its own with the client options, and takes middleware', async () => {
    const trainer = new Trainer({ baseURL: BASE_URL, apiKey: 'tk_t', logLevel: 'off' });
    trainer.use({
      onRequest: ({ request }) => {
        request.headers.set('X-From', 'trainer');
      },
    });
    const status = await trainer.status();
    expect(status).toMatchObject({ running_jobs: 0, runtime_available: true, workers_online: 1 });
    expect(mock.state.requests[0]?.headers).toMatchObject({
      authorization: 'Bearer tk_t',
      'x-from': 'trainer',
    });
  });

  it('estimates and recommends', async () => {
    const trainer = client().training;
    const estimate = await trainer.estimate({
      base_model: 'tiny-llama',
      method: 'lora',
      dataset_tokens: 100_000,
    });
    expect(estimate).toMatchObject({ params: 4_600_000, method: 'lora', fits: true });
    expect(estimate.memory_gb.total).toBeGreaterThan(0);
    await expect(trainer.estimate({ base_model: 'no-such-model' })).rejects.toBeInstanceOf(NotFoundError);
    const recommendation = await trainer.recommend({ params: 7_000_000_000, dataset_bytes: 4_000_000 });
    expect(recommendation).toMatchObject({ model_params: 7_000_000_000, dataset_tokens_est: 1_000_000 });
    expect(recommendation.windows.lr?.min).toBeLessThan(recommendation.recommended.lr);
  });

  it('counts jobs in stats', async () => {
    const tunery = client();
    const job = await tunery.training.jobs.create({ base_model: 'tiny-llama', train_texts: ['a'] });
    mock.advanceJob(job.id, 'completed');
    const stats = await tunery.training.stats();
    expect(stats).toMatchObject({
      total_jobs: 1,
      by_status: { completed: 1 },
      by_type: { finetune: 1 },
      adapters: 1,
      models: 1,
    });
    expect(stats.total_cost_usd).toBeCloseTo(0.06);
  });

  it('lists, saves, reads and deletes templates', async () => {
    const templates = client().training.templates;
    const builtin = await templates.list();
    expect(builtin.data.every((t) => t.builtin)).toBe(true);
    const saved = await templates.create({
      name: 'tiny-lora',
      config: { method: 'lora', lora_config: { r: 4 } },
    });
    expect(saved).toMatchObject({ name: 'tiny-lora', builtin: false });
    expect(await templates.retrieve('tiny-lora')).toEqual(saved);
    const job = await client().training.jobs.create({
      template: 'tiny-lora',
      base_model: 'tiny-llama',
      train_texts: ['x'],
    });
    expect(job.config).toMatchObject({ lora: { r: 4 } });
    await expect(templates.delete('lora-default')).rejects.toBeInstanceOf(ConflictError);
    expect(await templates.delete('tiny-lora')).toEqual({ id: 'tiny-lora', deleted: true });
    await expect(templates.get('tiny-lora')).rejects.toBeInstanceOf(NotFoundError);
  });

  it('reads and updates the auto-training config, which then starts a job', async () => {
    const tunery = client();
    expect(await tunery.training.autoConfig.get()).toMatchObject({ enabled: false, threshold: 100 });
    const { ok, config } = await tunery.training.autoConfig.update({
      enabled: true,
      threshold: 2,
      base_model: 'tiny-llama',
    });
    expect(ok).toBe(true);
    expect(config).toMatchObject({ enabled: true, threshold: 2, cooldown_hours: 24 });
    const call = { user_prompt: 'q', response: 'a' };
    await tunery.trajectories.create({ llm_calls: [call] });
    await tunery.trajectories.create({ llm_calls: [call] });
    const after = await tunery.training.autoConfig.get();
    expect(after.last_job_id).toMatch(/^job_/);
    expect(after.trajectories_since_last_run).toBe(0);
  });
});
