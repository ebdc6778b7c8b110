import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

describe.each(DATABASES)('idempotency keys on %s', (db) => {
  let server: TestServer;
  let datasetId: string;
  beforeAll(async () => {
    server = await startTestServer(db, { idempotencyStaleSeconds: 60 });
    const ds = await server.api('/v1/datasets', { method: 'POST', json: { train_texts: ['a', 'b'] } });
    datasetId = (await ds.json()).id;
  });
  afterAll(async () => {
    await server?.stop();
  });

  const body = () => ({ base_model: 'tiny/model', dataset_id: datasetId });
  const create = (key: string) =>
    server.api('/v1/training/jobs', { method: 'POST', json: body(), headers: { 'idempotency-key': key } });

  /**
   * The row a create leaves when it dies after reserving its key: no completed_at, no job. Its hash
   * is that of the request repeated below (as the server computed it for an earlier, finished one).
   */
  const inProgressKey = async (key: string, ageSeconds: number) => {
    const probe = `probe-${key}`;
    expect((await create(probe)).status).toBe(201);
    const { request_hash } = await server.ctx.knex('idempotency_keys').where({ key: probe }).first();
    await server.ctx.knex('idempotency_keys').insert({
      tenant_id: 'default',
      scope: 'training_jobs',
      key,
      request_hash,
      resource_id: 'job_never_created',
      created_at: server.ctx.knex.raw(`now() - make_interval(secs => ?)`, [ageSeconds]),
    });
  };

  it('a key whose create died is taken over once it is older than the bound', async () => {
    await inProgressKey('died-1', 61);
    const res = await create('died-1');
    expect(res.status).toBe(201);
    const { id } = await res.json();
    expect(id).not.toBe('job_never_created');
    // The key now names the new job, completed: a repeat answers it instead of creating another.
    const repeat = await create('died-1');
    expect(repeat.status).toBe(201);
    expect((await repeat.json()).id).toBe(id);
    expect(await server.ctx.knex('idempotency_keys').where({ key: 'died-1' })).toEqual([
      expect.objectContaining({ resource_id: id, completed_at: expect.any(Date) }),
    ]);
  });

  it('a key whose create died is not taken over by a different request body', async () => {
    await inProgressKey('died-2', 61);
    const other = await server.api('/v1/training/jobs', {
      method: 'POST',
      json: { ...body(), run_name: 'another request' },
      headers: { 'idempotency-key': 'died-2' },
    });
    expect(other.status).toBe(409);
    expect((await other.json()).error.code).toBe('idempotency_conflict');
    // the request the key was made for still completes
    expect((await create('died-2')).status).toBe(201);
  });

  it('a recent in-progress key still answers 409 request_in_progress', async () => {
    await inProgressKey('busy-1', 5);
    const res = await create('busy-1');
    expect(res.status).toBe(409);
    expect((await res.json()).error.code).toBe('request_in_progress');
    expect(await server.ctx.knex('jobs').where({ id: 'job_never_created' })).toEqual([]);
  });
});
