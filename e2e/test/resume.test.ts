// kill -9 a worker mid-run: the lease runs out, another worker resumes from the last checkpoint.
// On Postgres (a fresh database on TUNERY_TEST_DATABASE_URL), with a 3 s lease swept every 500 ms.
import type { MetricPoint } from '@tunery/sdk';
import { describe, expect, it } from 'vitest';
import { TRAIN_TEXTS } from '../src/data.js';
import { until } from '../src/stack.js';
import { TINY, useStack } from '../src/use-stack.js';

const stack = useStack({ name: 'resume', database: 'postgres', leaseSeconds: 3, sweepIntervalMs: 500 });

const STEPS = 40;
const SAVE_STEPS = 10;

describe('live resume after a killed worker (Postgres)', () => {
  it('finishes from the last checkpoint with retries = 1 and every step exactly once', async () => {
    const { client, workers, startWorker } = stack();
    const health = await client.health();
    expect(health.database).toBe('postgres');
    const created = await client.training.jobs.create({
      base_model: TINY,
      method: 'lora',
      run_name: 'e2e-resume',
      train_texts: TRAIN_TEXTS,
      training_config: { max_steps: STEPS, batch_size: 2, save_steps: SAVE_STEPS, logging_steps: 1 },
    });

    // Wait for the first uploaded checkpoint, then kill the worker without warning.
    const before = await until(
      'the first checkpoint',
      async () => {
        const job = await client.training.jobs.retrieve(created.id);
        return job.last_checkpoint_step > 0 ? job : undefined;
      },
      { timeoutMs: 90_000, intervalMs: 50 },
    );
    await workers[0]!.kill9();
    const killedAt = (await client.training.jobs.retrieve(created.id)).current_step;
    expect(before.status).toBe('running');
    expect(before.last_checkpoint_step).toBeLessThan(STEPS);

    startWorker('second');
    const job = await client.training.jobs.waitForCompletion(created.id, {
      pollIntervalMs: 250,
      timeout: 90_000,
    });
    expect(job, JSON.stringify(job.error)).toMatchObject({
      status: 'completed',
      retries: 1,
      current_step: STEPS,
      total_steps: STEPS,
      last_checkpoint_step: STEPS,
    });
    expect(job.attempt).toBe(2);

    // Metrics: every step once, continuing past the checkpoint the second attempt resumed from.
    const { points } = await client.training.jobs.metrics(job.id, { since_step: -1, limit: 1000 });
    const train = points.filter((p: MetricPoint) => p.phase === 'train').map((p) => p.step);
    expect(train).toEqual(Array.from({ length: STEPS }, (_, i) => i + 1));
    expect(killedAt).toBeGreaterThanOrEqual(before.last_checkpoint_step);

    const { events } = await client.training.jobs.events(job.id);
    const resumed = events.find((e) => e.kind === 'resumed');
    expect(resumed, JSON.stringify(events.map((e) => e.kind))).toBeDefined();
    const resumedStep = (resumed!.payload as { step?: number }).step!;
    expect(resumedStep % SAVE_STEPS).toBe(0);
    expect(resumedStep).toBeGreaterThanOrEqual(before.last_checkpoint_step);
    expect(resumedStep).toBeLessThan(STEPS);

    const logs = await client.training.jobs.logs(job.id);
    expect(logs.lines.some((l) => l.text.startsWith(`resumed from checkpoint-${resumedStep}`))).toBe(true);
    const seqs = logs.lines.map((l) => l.seq);
    expect(new Set(seqs).size).toBe(seqs.length);

    const { checkpoints } = await client.training.jobs.checkpoints(job.id);
    expect(checkpoints.map((c) => c.step)).toEqual([10, 20, 30, 40]);
    const outputs = await client.training.jobs.outputs(job.id);
    expect(outputs.files.map((f) => f.name)).toContain('adapter_model.safetensors');
  });
});
