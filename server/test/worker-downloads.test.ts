/** Worker file downloads open only with the live lease of a job that reads the file. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createFinetune, fakeWorker } from './fake-worker.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

describe.each(DATABASES)('worker downloads on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(async () => {
    await server?.stop();
  });

  it('serve a job input only to the worker holding that job lease', async () => {
    const first = await createFinetune(server, { train_texts: ['first job'] });
    const second = await createFinetune(server, { train_texts: ['second job'] });
    const worker = fakeWorker(server);
    const a = (await worker.claim())!;
    const b = (await worker.claim())!;
    expect([a.job_id, b.job_id]).toEqual([first, second]);
    const aData = a.inputs[0]!.download_url;
    const bData = b.inputs[0]!.download_url;

    const own = await worker.download(aData, a.lease_token);
    expect(own.status).toBe(200);
    expect(await own.text()).toBe('{"text":"first job"}\n');

    // Another job's lease, an unknown token, or no lease at all open nothing.
    const other = await worker.download(bData, a.lease_token);
    expect(other.status).toBe(404);
    expect((await other.json()).error.code).toBe('not_found');
    expect((await worker.download(aData, 'lease_not_a_real_one')).status).toBe(404);
    const bare = await server.api(aData, { key: server.workerToken });
    expect(bare.status).toBe(400);
    expect((await bare.json()).error.param).toBe('x-lease-token');

    // The job's own checkpoints are readable with its lease, not with another's.
    await worker.upload(a.job_id, a.lease_token, 'checkpoints', 'checkpoint-1', Buffer.from('state'), 1);
    const ckpt = await server.ctx
      .knex('files')
      .where({ owner_kind: 'checkpoint', owner_id: a.job_id })
      .first();
    const ckptUrl = `/v1/workers/files/${ckpt.id}`;
    expect(await (await worker.download(ckptUrl, a.lease_token)).text()).toBe('state');
    expect((await worker.download(ckptUrl, b.lease_token)).status).toBe(404);

    // A lease that ended opens nothing either.
    expect((await worker.complete(a.job_id, a.lease_token)).status).toBe(200);
    expect((await worker.download(aData, a.lease_token)).status).toBe(404);
    expect((await worker.download(bData, b.lease_token)).status).toBe(200);
  });
});
