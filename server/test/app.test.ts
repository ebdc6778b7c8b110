import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { unhandledOperations } from '../src/app.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

describe('routes', () => {
  it('every spec operation has a handler', () => {
    expect(unhandledOperations()).toEqual([]);
  });
});

describe.each(DATABASES)('app basics on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(async () => {
    await server?.stop();
  });

  it('answers health without a key', async () => {
    const res = await server.api('/v1/health', { key: null });
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ status: 'ok', database: db });
    expect(res.headers.get('x-request-id')).toMatch(/^req_/);
  });

  it('answers version', async () => {
    const res = await server.api('/v1/version', { key: null });
    expect(await res.json()).toMatchObject({ version: '0.1.0', api_version: '0.1.0' });
  });

  it('refuses a missing or wrong key with the error shape', async () => {
    for (const key of [null, 'tk_wrong']) {
      const res = await server.api('/v1/training/jobs', { key });
      expect(res.status).toBe(401);
      const body = await res.json();
      expect(body.error.code).toBe('unauthorized');
      expect(body.error).toHaveProperty('param');
    }
  });

  it('refuses a worker token on user endpoints and a user key on worker endpoints', async () => {
    expect((await server.api('/v1/training/jobs', { key: server.workerToken })).status).toBe(401);
    const res = await server.api('/v1/workers/claim', {
      method: 'POST',
      json: { worker_id: 'w', capabilities: { job_types: ['finetune'], device: 'cpu' }, wait_seconds: 0 },
    });
    expect(res.status).toBe(401);
  });

  it('answers unknown routes with a JSON 404', async () => {
    const res = await server.api('/v1/nope');
    expect(res.status).toBe(404);
    expect(res.headers.get('content-type')).toMatch(/json/);
    expect((await res.json()).error.code).toBe('not_found');
  });

  it('answers malformed JSON with 400 invalid_request', async () => {
    const res = await server.api('/v1/training/jobs', {
      method: 'POST',
      body: '{"base_model": ',
      headers: { 'content-type': 'application/json' },
    });
    expect(res.status).toBe(400);
    expect((await res.json()).error.code).toBe('invalid_request');
  });

  it('answers an oversized body with 413 payload_too_large', async () => {
    const res = await server.api('/v1/training/jobs', {
      method: 'POST',
      json: { base_model: 'x', train_texts: ['a'.repeat(11 * 1024 * 1024)] },
    });
    expect(res.status).toBe(413);
    expect((await res.json()).error.code).toBe('payload_too_large');
  });

  it('answers oversized headers with the JSON error shape', async () => {
    const res = await server.api('/v1/training/jobs', { headers: { 'x-filler': 'a'.repeat(20_000) } });
    expect(res.status).toBe(431);
    expect((await res.json()).error.code).toBe('invalid_request');
  });

  it('names the offending field of an invalid body', async () => {
    const res = await server.api('/v1/training/jobs', {
      method: 'POST',
      json: { base_model: 'x', train_texts: ['hi'], training_config: { batch_size: 0 } },
    });
    expect(res.status).toBe(400);
    const body = await res.json();
    expect(body.error).toMatchObject({ code: 'invalid_request', param: 'training_config.batch_size' });
  });
});
