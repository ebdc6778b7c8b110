import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSweeper, type Sweeper } from '../src/queue/sweeper.js';
import { createFinetune, fakeWorker, sleep } from './fake-worker.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

describe.each(DATABASES)('lease expiry over HTTP on %s', (db) => {
  let server: TestServer;
  // The tests run the rescuer's passes themselves, so a slow machine cannot rescue a job mid-test.
  let sweeper: Sweeper;
  beforeAll(async () => {
    server = await startTestServer(db, { leaseSeconds: 1, sweepIntervalMs: 60_000 });
    sweeper = createSweeper(server.ctx, { intervalMs: 60_000 });
  });
  afterAll(async () => {
    await sweeper?.stop();
    await server?.stop();
  });

  it('reclaims a job whose worker went silent; the old token is fenced out', async () => {
    const id = await createFinetune(server);
    const first = fakeWorker(server, 'doomed');
    const second = fakeWorker(server, 'rescuer');
    const lost = (await first.claim())!;
    await first.logs(id, lost.lease_token, [{ seq: 1, text: 'before the crash' }]);
    await first.upload(id, lost.lease_token, 'checkpoints', 'checkpoint-3', Buffer.from('state'), 3);

    // no heartbeat: the lease lapses and the sweeper gives the job back
    await sleep(1200);
    expect(await sweeper.runOnce()).toEqual({ retried: 1, cancelled: 0, failed: 0 });
    const job = await (await server.api(`/v1/training/jobs/${id}`)).json();
    expect(job).toMatchObject({ status: 'pending', retries: 1, last_checkpoint_step: 3 });

    const taken = (await second.claim())!;
    expect(taken).toMatchObject({ job_id: id, attempt: 2, log_seq: 1 });
    expect(taken.resume_from).toMatchObject({ name: 'checkpoint-3', step: 3 });
    expect(await (await second.download(taken.resume_from!.download_url, taken.lease_token)).text()).toBe(
      'state',
    );

    const stale = [
      await first.heartbeat(id, lost.lease_token),
      await first.logs(id, lost.lease_token, [{ seq: 2, text: 'zombie' }]),
      await first.metrics(id, lost.lease_token, [{ step: 4, phase: 'train', loss: 9 }]),
      await first.events(id, lost.lease_token, { phase: 'export' }),
      await first.upload(id, lost.lease_token, 'outputs', 'zombie.bin', Buffer.from('z')),
      await first.complete(id, lost.lease_token, { loss_final: 9 }),
      await first.fail(id, lost.lease_token),
    ];
    for (const res of stale) {
      expect(res.status).toBe(409);
      expect((await res.json()).error.code).toBe('lease_lost');
    }
    const heartbeat = await second.heartbeat(id, taken.lease_token, { current_step: 4 });
    expect(heartbeat.status).toBe(200);
    expect((await second.complete(id, taken.lease_token, { loss_final: 0.1 })).status).toBe(200);
    const done = await (await server.api(`/v1/training/jobs/${id}`)).json();
    expect(done).toMatchObject({
      status: 'completed',
      retries: 1,
      attempt: 2,
      current_step: 10,
      progress: 100,
    });
    const logs = await (await server.api(`/v1/training/jobs/${id}/logs`)).json();
    expect(logs.lines.map((l: { text: string }) => l.text)).toEqual(['before the crash']);
    const outcomes = await server.ctx
      .knex('job_attempts')
      .where({ job_id: id })
      .orderBy('attempt')
      .pluck('outcome');
    expect(outcomes).toEqual(['lease_expired', 'completed']);
    const events = await (await server.api(`/v1/training/jobs/${id}/events`)).json();
    expect(events.events.map((e: { kind: string }) => e.kind)).toContain('retry');
  });

  it("cuts off a stale attempt's upload when the current attempt stores the same file", async () => {
    await server.ctx.knex('jobs').whereIn('status', ['pending', 'running']).update({ status: 'cancelled' });
    const id = await createFinetune(server);
    const first = fakeWorker(server, 'slow');
    const second = fakeWorker(server, 'fast');
    const lost = (await first.claim())!;
    let finish!: () => void;
    const gate = new Promise<void>((resolve) => {
      finish = resolve;
    });
    const body = new ReadableStream<Uint8Array>({
      async start(controller) {
        controller.enqueue(new TextEncoder().encode('zom'));
        await gate;
        controller.enqueue(new TextEncoder().encode('bie'));
        controller.close();
      },
    });
    // the stale upload starts while its lease is still good…
    const slowUpload = server
      .api(`/v1/workers/jobs/${id}/outputs/adapter.bin`, {
        key: server.workerToken,
        method: 'PUT',
        body,
        duplex: 'half',
        headers: { 'content-type': 'application/octet-stream', 'x-lease-token': lost.lease_token },
      } as RequestInit)
      .then(
        (answer) => `answered ${answer.status}`,
        () => 'connection closed',
      );
    await sleep(1200);
    expect(await sweeper.runOnce()).toMatchObject({ retried: 1 });
    const taken = (await second.claim())!;
    // …and the current attempt's upload of the same name takes the file over: the newest request for
    // a file wins (storage.openPart), so the stale request is cut off before the fresh one is stored
    expect(
      (await second.upload(id, taken.lease_token, 'outputs', 'adapter.bin', Buffer.from('fresh'))).status,
    ).toBe(201);
    finish();
    expect(await slowUpload).toBe('connection closed');
    const file = await server.api(`/v1/training/jobs/${id}/output/adapter.bin`);
    expect(await file.text()).toBe('fresh');
  });

  it('keeps a heartbeating job and ends a lapsed cancel as cancelled', async () => {
    await server.ctx.knex('jobs').whereIn('status', ['pending', 'running']).update({ status: 'cancelled' });
    const id = await createFinetune(server);
    const worker = fakeWorker(server);
    const job = (await worker.claim())!;
    for (let i = 0; i < 4; i++) {
      await sleep(500);
      expect((await worker.heartbeat(id, job.lease_token)).status).toBe(200);
      expect(await sweeper.runOnce()).toEqual({ retried: 0, cancelled: 0, failed: 0 });
    }
    expect((await server.ctx.knex('jobs').where({ id }).first()).status).toBe('running');
    await server.api(`/v1/training/jobs/${id}/cancel`, { method: 'POST' });
    await sleep(1200);
    expect(await sweeper.runOnce()).toEqual({ retried: 0, cancelled: 1, failed: 0 });
    expect((await server.ctx.knex('jobs').where({ id }).first()).status).toBe('cancelled');
    expect((await worker.cancelled(id, job.lease_token)).status).toBe(200); // the late acknowledgement is harmless
  });
});
