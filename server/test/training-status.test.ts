/** GET /v1/training/status tells, for each online worker, what it is running now. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createFinetune, fakeWorker } from './fake-worker.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

describe.each(DATABASES)('training status on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(async () => {
    await server?.stop();
  });

  const status = async (key?: string) => {
    const res = await server.api('/v1/training/status', key ? { key } : {});
    expect(res.status).toBe(200);
    return res.json();
  };

  it('lists the serving workers with the backend their claims name', async () => {
    expect((await status()).serving_workers).toEqual([]);
    const claim = (workerId: string, backend?: string) =>
      server.api('/v1/workers/inference/claim', {
        key: server.workerToken,
        method: 'POST',
        json: { worker_id: workerId, wait_seconds: 0, ...(backend ? { backend } : {}) },
      });
    expect((await claim('serve-gpu', 'vllm')).status).toBe(204);
    expect((await claim('serve-cpu', 'transformers')).status).toBe(204);
    expect((await claim('serve-gpu')).status).toBe(204); // a claim that does not say keeps what was said
    const serving = (await status()).serving_workers as { worker_id: string; backend: string }[];
    expect(serving.map(({ worker_id, backend }) => ({ worker_id, backend }))).toEqual([
      { worker_id: 'serve-cpu', backend: 'transformers' },
      { worker_id: 'serve-gpu', backend: 'vllm' },
    ]);
    const bad = await claim('serve-x', 'llama.cpp');
    expect(bad.status).toBe(400);
    await server.ctx.knex('serving_workers').delete();
  });

  it('lists each online worker with the jobs it runs now: the caller’s named, others counted', async () => {
    expect(await status()).toMatchObject({ workers_online: 0, runtime_available: false, workers: [] });

    const a = fakeWorker(server, 'worker-a');
    const b = fakeWorker(server, 'worker-b');
    const idle = fakeWorker(server, 'worker-c');
    const mine = await createFinetune(server, { run_name: 'mine' });
    const claimedA = (await a.claim({ job_types: ['finetune'], methods: ['lora'], device: 'cuda' }))!;
    expect(claimedA.job_id).toBe(mine);
    const theirs = await server.api('/v1/training/jobs', {
      method: 'POST',
      key: server.otherKey,
      json: { base_model: 'smollm2-135m-instruct', train_texts: ['x', 'y'], max_steps: 4 },
    });
    expect(theirs.status).toBe(201);
    const claimedB = (await b.claim())!;
    expect(claimedB.job_id).toBe((await theirs.json()).id);
    expect(await idle.claim()).toBeNull();
    expect((await a.heartbeat(mine, claimedA.lease_token, { current_step: 3, total_steps: 10 })).status).toBe(
      200,
    );

    const seen = await status();
    expect(seen).toMatchObject({ workers_online: 3, runtime_available: true, running_jobs: 1 });
    expect(seen.workers).toEqual([
      {
        worker_id: 'worker-a',
        device: 'cuda',
        job_types: ['finetune'],
        methods: ['lora'],
        last_seen_at: expect.any(String),
        busy: true,
        running_jobs: [
          {
            job_id: mine,
            kind: 'training',
            type: 'finetune',
            method: 'lora',
            phase: expect.any(String),
            current_step: 3,
            total_steps: 10,
            started_at: expect.any(String),
          },
        ],
        other_running_jobs: 0,
      },
      expect.objectContaining({ worker_id: 'worker-b', busy: true, running_jobs: [], other_running_jobs: 1 }),
      expect.objectContaining({
        worker_id: 'worker-c',
        device: 'cpu',
        methods: null,
        busy: false,
        running_jobs: [],
        other_running_jobs: 0,
      }),
    ]);
    // the other tenant sees its own job by id and ours only counted
    const other = await status(server.otherKey);
    expect(other.workers[0]).toMatchObject({
      worker_id: 'worker-a',
      running_jobs: [],
      other_running_jobs: 1,
    });
    expect(other.workers[1].running_jobs.map((j: { job_id: string }) => j.job_id)).toEqual([claimedB.job_id]);

    // once its job ends, the worker runs nothing
    expect((await a.complete(mine, claimedA.lease_token)).status).toBe(200);
    const after = await status();
    expect(after.workers[0]).toMatchObject({ worker_id: 'worker-a', busy: false, running_jobs: [] });
    // a worker not seen for over a minute is not listed
    await server.ctx
      .knex('workers')
      .where({ id: 'worker-c' })
      .update({ last_seen_at: new Date(Date.now() - 3600_000) });
    expect((await status()).workers.map((w: { worker_id: string }) => w.worker_id)).toEqual([
      'worker-a',
      'worker-b',
    ]);
  });
});
