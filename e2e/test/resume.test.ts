// kill -9 a worker mid-run: the lease runs out, another worker resumes from the last checkpoint.
// On Postgres (a fresh database on TUNERY_TEST_DATABASE_URL), with a 3 s lease swept every 500 ms.
import type { MetricPoint } from '@tunery/sdk';
import { describe, expect, it } from 'vitest';
import { TRAIN_TEXTS } from '../src/data.js';
import { HoldProxy } from '../src/hold-proxy.js';
import { TINY, useStack } from '../src/use-stack.js';

// No worker at start: the first one talks to the server through a HoldProxy (see the test).
const stack = useStack({
  name: 'resume',
  database: 'postgres',
  leaseSeconds: 3,
  sweepIntervalMs: 500,
  workers: 0,
});

const STEPS = 40;
const SAVE_STEPS = 10;

describe('live resume after a killed worker (Postgres)', () => {
  it('finishes from the last checkpoint with retries = 1 and every step exactly once', async () => {
    const { client, url, workers, startWorker } = stack();
    const health = await client.health();
    expect(health.database).toBe('postgres');
    const created = await client.training.jobs.create({
      base_model: TINY,
      method: 'lora',
      run_name: 'e2e-resume',
      train_texts: TRAIN_TEXTS,
      training_config: { max_steps: STEPS, batch_size: 2, save_steps: SAVE_STEPS, logging_steps: 1 },
    });

    // The worker uploads checkpoint-10 through a proxy that holds the server's answer back: the
    // server has the checkpoint, and the worker waits on its upload until it is killed. No poll can
    // miss the moment, however fast the worker trains.
    const proxy = await HoldProxy.start(url);
    try {
      const held = proxy.holdNext(
        ({ method, path }) =>
          method === 'PUT' &&
          path.startsWith(`/v1/workers/jobs/${created.id}/checkpoints/checkpoint-${SAVE_STEPS}?`),
      );
      startWorker('first', proxy.url);
      expect((await held).status).toBe(201);
      await workers[0]!.kill9();
    } finally {
      await proxy.close();
    }
    // Running, or already back in the queue if its lease ran out: either way attempt 1, checkpoint 10.
    const before = await client.training.jobs.retrieve(created.id);
    expect(before).toMatchObject({ attempt: 1, last_checkpoint_step: SAVE_STEPS });
    const killedAt = before.current_step;

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
    expect(resumedStep).toBe(SAVE_STEPS);

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
