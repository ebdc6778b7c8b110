import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createKey } from '../src/auth.js';
import { loadConfig } from '../src/config.js';
import { rescueExpiredLeases } from '../src/queue/rescue.js';
import { type RunningServer, startServer } from '../src/server.js';
import { fakeWorker } from './fake-worker.js';
import { DATABASES, type DatabaseChoice, type TestServer } from './harness.js';

const adminUrl = process.env.TUNERY_TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test';

/** A database that outlives one server: a file-backed PGlite directory, or its own Postgres database. */
async function durableDatabase(choice: DatabaseChoice) {
  const dataDir = await mkdtemp(join(tmpdir(), 'tunery-restart-'));
  if (choice === 'pglite')
    return { dataDir, url: undefined, drop: () => rm(dataDir, { recursive: true, force: true }) };
  const name = `tunery_restart_${process.pid}_${Math.random().toString(36).slice(2, 8)}`;
  const admin = new pg.Client({ connectionString: adminUrl });
  await admin.connect();
  await admin.query(`CREATE DATABASE ${name}`);
  await admin.end();
  const url = new URL(adminUrl);
  url.pathname = `/${name}`;
  return {
    dataDir,
    url: url.toString(),
    drop: async () => {
      const c = new pg.Client({ connectionString: adminUrl });
      await c.connect();
      await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      await c.end();
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}

/** Just enough of the test harness's server for fakeWorker and user calls. */
function asTestServer(server: RunningServer, key: string, workerToken: string, dataDir: string): TestServer {
  return {
    ...server,
    key,
    otherKey: key,
    workerToken,
    dataDir,
    stop: server.close,
    api: (path, init = {}) => {
      const headers = new Headers(init.headers);
      headers.set('authorization', `Bearer ${init.key ?? key}`);
      let body = init.body;
      if (init.json !== undefined) {
        headers.set('content-type', 'application/json');
        body = JSON.stringify(init.json);
      }
      return fetch(`${server.url}${path}`, { ...init, headers, body });
    },
  };
}

describe.each(DATABASES)('server restart mid-job on %s', (db) => {
  let database: Awaited<ReturnType<typeof durableDatabase>>;
  beforeAll(async () => {
    database = await durableDatabase(db);
  });
  afterAll(async () => {
    await database?.drop();
  });

  const start = () =>
    startServer(
      loadConfig({ port: 0, dataDir: database.dataDir, databaseUrl: database.url, sweepIntervalMs: 200 }),
      {
        quiet: true,
      },
    );

  it('loses nothing: the same lease token keeps working on a new server', async () => {
    const first = await start();
    const key = first.adminKey!;
    const workerToken = await createKey(first.ctx.knex, { kind: 'worker' });
    let server = asTestServer(first, key, workerToken, database.dataDir);
    const created = await server.api('/v1/training/jobs', {
      method: 'POST',
      json: { base_model: 'smollm2-135m-instruct', train_texts: ['a', 'b'], max_steps: 8 },
    });
    const id = (await created.json()).id;
    const job = (await fakeWorker(server).claim())!;
    await fakeWorker(server).logs(id, job.lease_token, [{ seq: 1, text: 'first server' }]);
    await fakeWorker(server).upload(
      id,
      job.lease_token,
      'checkpoints',
      'checkpoint-4',
      Buffer.from('ckpt'),
      4,
    );
    await first.close();

    const second = await start();
    try {
      expect(second.adminKey).toBeUndefined();
      server = asTestServer(second, key, workerToken, database.dataDir);
      const worker = fakeWorker(server);
      expect((await worker.heartbeat(id, job.lease_token, { current_step: 6 })).status).toBe(200);
      expect((await worker.logs(id, job.lease_token, [{ seq: 2, text: 'second server' }])).status).toBe(200);
      expect(
        (await worker.upload(id, job.lease_token, 'outputs', 'adapter_model.safetensors', Buffer.from('w')))
          .status,
      ).toBe(201);
      expect((await worker.complete(id, job.lease_token, { loss_final: 0.3 })).status).toBe(200);

      const done = await (await server.api(`/v1/training/jobs/${id}`)).json();
      expect(done).toMatchObject({ status: 'completed', retries: 0, attempt: 1, last_checkpoint_step: 4 });
      // this server never saw the claim: its completion plans from the job it reads
      const adapter = await (await server.api(`/v1/adapters/${done.adapter_name}`)).json();
      expect(adapter).toMatchObject({ job_id: id, metrics: { final_loss: 0.3, training_steps: 8 } });
      const logs = await (await server.api(`/v1/training/jobs/${id}/logs`)).json();
      expect(logs.lines.map((l: { text: string }) => l.text)).toEqual(['first server', 'second server']);
      const checkpoints = await (await server.api(`/v1/training/jobs/${id}/checkpoints`)).json();
      expect(checkpoints.checkpoints.map((c: { name: string }) => c.name)).toEqual(['checkpoint-4']);
      const file = await server.api(`/v1/training/jobs/${id}/output/adapter_model.safetensors`);
      expect(await file.text()).toBe('w');
    } finally {
      await second.close();
    }
  }, 120_000); // two full server starts on a file-backed database: slow on a busy machine
});

describe.each(DATABASES)('leases that lapse while the server is down on %s', (db) => {
  let database: Awaited<ReturnType<typeof durableDatabase>>;
  beforeAll(async () => {
    database = await durableDatabase(db);
  });
  afterAll(async () => {
    await database?.drop();
  });

  // The first server never sweeps on its own; the second's passes are run by the test.
  const start = () =>
    startServer(
      loadConfig({ port: 0, dataDir: database.dataDir, databaseUrl: database.url, sweepIntervalMs: 60_000 }),
      { quiet: true },
    );

  it('are extended at start, so the worker keeps its job and no attempt is spent', async () => {
    const first = await start();
    const key = first.adminKey!;
    const workerToken = await createKey(first.ctx.knex, { kind: 'worker' });
    let server = asTestServer(first, key, workerToken, database.dataDir);
    const created = await server.api('/v1/training/jobs', {
      method: 'POST',
      json: { base_model: 'smollm2-135m-instruct', train_texts: ['a', 'b'], max_steps: 8 },
    });
    const id = (await created.json()).id;
    const job = (await fakeWorker(server).claim())!;
    // The server stays down for longer than the lease: when it is back, the lease has lapsed.
    await first.ctx
      .knex('jobs')
      .where({ id })
      .update({ lease_expires_at: first.ctx.knex.raw(`now() - interval '1 hour'`) });
    await first.close();

    const second = await start();
    try {
      server = asTestServer(second, key, workerToken, database.dataDir);
      // The sweeper's first pass after the start rescues nothing ...
      expect(await rescueExpiredLeases(second.ctx, 100)).toEqual({ retried: 0, cancelled: 0, failed: 0 });
      // ... so the worker, heartbeating again, still holds its job, on its first attempt.
      expect((await fakeWorker(server).heartbeat(id, job.lease_token)).status).toBe(200);
      const row = await second.ctx.knex('jobs').where({ id }).first();
      expect(row).toMatchObject({ status: 'running', attempt: 1, retries: 0 });
      const kinds = (await second.ctx.knex('job_events').where({ job_id: id }).orderBy('seq')).map(
        (e) => e.kind,
      );
      expect(kinds).toContain('lease_extended');
      expect(kinds).not.toContain('retry');
    } finally {
      await second.close();
    }
  }, 120_000);
});
