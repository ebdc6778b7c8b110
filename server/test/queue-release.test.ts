/** A worker's hand-back on shutdown: back to the queue at once, and no retry used up. */
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { newId } from '../src/ids.js';
import { enqueueJob } from '../src/queue/enqueue.js';
import { fakeWorker } from './fake-worker.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

describe.each(DATABASES)('releasing a job on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db, { retryBaseSeconds: 0, sweepIntervalMs: 60_000 });
  });
  afterAll(async () => {
    await server?.stop();
  });
  // Each test claims the job it made.
  beforeEach(async () => {
    await server.ctx.knex('jobs').whereIn('status', ['pending', 'running']).update({ status: 'cancelled' });
  });

  const enqueue = async (maxAttempts: number) => {
    const id = newId('job');
    await enqueueJob(server.ctx, server.ctx.knex, {
      id,
      tenantId: 'default',
      kind: 'training',
      type: 'finetune',
      config: {},
      maxAttempts,
    });
    return id;
  };
  const release = (jobId: string, token: string) =>
    server.api(`/v1/workers/jobs/${jobId}/release`, {
      key: server.workerToken,
      method: 'POST',
      json: { lease_token: token },
    });
  const outcomes = async (jobId: string) =>
    (await server.ctx.knex('job_attempts').where({ job_id: jobId }).orderBy('attempt')).map((a) => a.outcome);

  it('hand-backs do not use up attempts; real failures still do', async () => {
    const id = await enqueue(2);
    const worker = fakeWorker(server);
    for (let i = 1; i <= 3; i++) {
      const job = (await worker.claim())!;
      expect(job).toMatchObject({ job_id: id, attempt: i });
      if (i === 2) {
        await worker.upload(id, job.lease_token, 'checkpoints', 'checkpoint-7', Buffer.from('s'), 7);
      }
      const res = await release(id, job.lease_token);
      expect(res.status).toBe(200);
      expect(await res.json()).toMatchObject({ job_id: id, status: 'pending', will_retry: true });
      // A repeated hand-back (its first answer lost) is answered the same and changes nothing.
      expect((await (await release(id, job.lease_token)).json()).status).toBe('pending');
    }
    // Three shutdowns later, the job still has both of its attempts for failures.
    const fourth = (await worker.claim())!;
    expect(fourth.resume_from).toMatchObject({ name: 'checkpoint-7', step: 7 });
    expect((await (await worker.fail(id, fourth.lease_token)).json()).status).toBe('pending');
    const fifth = (await worker.claim())!;
    expect((await (await worker.fail(id, fifth.lease_token)).json()).status).toBe('failed');

    expect(await outcomes(id)).toEqual(['released', 'released', 'released', 'retry', 'failed']);
    const events = await server.ctx.knex('job_events').where({ job_id: id, kind: 'released' }).orderBy('seq');
    expect(events.map((e) => e.payload.attempt)).toEqual([1, 2, 3]);
    expect(events.map((e) => e.payload.by)).toEqual(['worker', 'worker', 'worker']);
    expect(events[2].payload.resume_checkpoint).toBe('checkpoint-7');
  });

  it('a job whose owner asked to cancel ends cancelled; a stale lease is refused', async () => {
    const id = await enqueue(5);
    const worker = fakeWorker(server);
    const job = (await worker.claim())!;
    await server.api(`/v1/training/jobs/${id}/cancel`, { method: 'POST' });
    const res = await release(id, job.lease_token);
    expect(await res.json()).toMatchObject({ status: 'cancelled', will_retry: false });
    expect(await outcomes(id)).toEqual(['cancelled']);

    const other = await enqueue(5);
    const claimed = (await worker.claim())!;
    const stale = await release(other, 'lease_of_someone_else');
    expect(stale.status).toBe(409);
    expect((await stale.json()).error.code).toBe('lease_lost');
    expect((await release(other, claimed.lease_token)).status).toBe(200);
  });
});
