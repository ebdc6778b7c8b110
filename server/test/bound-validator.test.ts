/**
 * The hot operations are validated by bound-validator.ts, the rest by express-openapi-validator:
 * the same bad requests must get the same answers from both. Each case goes to the server and to a
 * second app on the same context with no bound operations (express-openapi-validator for all).
 */
import { IncomingMessage, type Server, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import express, { type NextFunction, type Request, type Response } from 'express';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { createApp } from '../src/app.js';
import { assertSupported, BOUND_OPERATIONS, boundValidator } from '../src/bound-validator.js';
import { specOperations } from '../src/spec.js';
import { createFinetune } from './fake-worker.js';
import { startTestServer, type TestServer } from './harness.js';

interface Case {
  name: string;
  method?: 'GET' | 'POST' | 'HEAD';
  path: string;
  /** Sent as is; `contentType` defaults to JSON when there is a body. */
  body?: string;
  contentType?: string | null;
  /** `unknown`: a key never seen, so its lookup reaches the database. */
  key?: 'user' | 'worker' | 'wrong' | 'unknown' | null;
  /** Every database connection fails while the request runs. */
  databaseDown?: boolean;
  /** Sent besides the key and content type (a request id, an origin). */
  headers?: Record<string, string>;
}

const json = (value: unknown) => JSON.stringify(value);
/** The test server's CORS origin and JSON size limit, so both are exercised. */
const ALLOWED_ORIGIN = 'https://app.example';
const MAX_JSON_BYTES = 64 * 1024;
// Merges only: the finetune job stays pending, so a valid claim answers 204 from both.
const capabilities = { job_types: ['merge'], device: 'cpu' };
const claim = (fields: Record<string, unknown>) =>
  json({ worker_id: 'w', capabilities, wait_seconds: 0, ...fields });

/** Bad (and a few good) requests to each bound operation; `JOB` is replaced by a real job id. */
const CASES: Case[] = [
  { name: 'get: the job', path: '/v1/training/jobs/JOB' },
  { name: 'get: HEAD (not in the spec)', method: 'HEAD', path: '/v1/training/jobs/JOB' },
  { name: 'get: database down', path: '/v1/training/jobs/JOB', key: 'unknown', databaseDown: true },
  {
    name: 'heartbeat: text body and an id off the pattern',
    method: 'POST',
    path: '/v1/workers/jobs/a.b/heartbeat',
    body: '{}',
    contentType: 'text/plain',
    key: 'worker',
  },
  {
    name: 'claim: text body and a query parameter',
    method: 'POST',
    path: '/v1/workers/claim?x=1',
    body: '{}',
    contentType: 'text/plain',
    key: 'worker',
  },
  { name: 'get: no key', path: '/v1/training/jobs/JOB', key: null },
  { name: 'get: wrong key', path: '/v1/training/jobs/JOB', key: 'wrong' },
  { name: 'get: worker token', path: '/v1/training/jobs/JOB', key: 'worker' },
  { name: 'get: unknown query parameter', path: '/v1/training/jobs/JOB?verbose=1' },
  { name: 'get: id off the pattern', path: '/v1/training/jobs/job%20one' },
  { name: 'get: id too long', path: `/v1/training/jobs/${'j'.repeat(65)}` },
  { name: 'get: no such job', path: '/v1/training/jobs/job_missing' },
  // How the route table (route-table.ts) finds the route must be how Express's router does.
  { name: 'get: trailing slash', path: '/v1/training/jobs/JOB/' },
  { name: 'get: path in other case', path: '/V1/Training/Jobs/JOB' },
  { name: 'get: percent-encoded id', path: '/v1/training/jobs/%6Aob_missing' },
  { name: 'get: malformed percent-encoding', path: '/v1/training/jobs/job%E0%A4%A' },
  { name: 'get: empty segment', path: '/v1/training//jobs/JOB' },
  { name: 'get: two trailing slashes', path: '/v1/training/jobs/JOB//' },
  { name: 'complete batch: GET', path: '/v1/workers/jobs/complete', key: 'worker' },
  // What runs before the route (app.ts everyRequest, the JSON body parser) must run on the table's too.
  {
    name: 'get: request id and an allowed origin',
    path: '/v1/training/jobs/JOB',
    headers: { 'x-request-id': 'req_given', origin: ALLOWED_ORIGIN },
  },
  {
    name: 'claim: an origin not allowed',
    method: 'POST',
    path: '/v1/workers/claim',
    body: claim({}),
    key: 'worker',
    headers: { origin: 'https://elsewhere.example' },
  },
  {
    name: 'claim: malformed JSON',
    method: 'POST',
    path: '/v1/workers/claim',
    body: '{"worker_id":',
    key: 'worker',
  },
  {
    name: 'claim: body over the size limit',
    method: 'POST',
    path: '/v1/workers/claim',
    body: claim({ worker_id: 'w'.repeat(MAX_JSON_BYTES) }),
    key: 'worker',
  },
  {
    name: 'claim: nested too deep',
    method: 'POST',
    path: '/v1/workers/claim',
    body: `${'['.repeat(65)}${']'.repeat(65)}`,
    key: 'worker',
  },
  {
    name: 'claim: a lone surrogate',
    method: 'POST',
    path: '/v1/workers/claim',
    body: claim({ worker_id: '\ud800' }),
    key: 'worker',
  },
  {
    name: 'claim: a charset JSON does not use',
    method: 'POST',
    path: '/v1/workers/claim',
    body: claim({}),
    contentType: 'application/json; charset=utf-16',
    key: 'worker',
  },
  { name: 'claim: none waiting', method: 'POST', path: '/v1/workers/claim', body: claim({}), key: 'worker' },
  { name: 'claim: user key', method: 'POST', path: '/v1/workers/claim', body: claim({}), key: 'user' },
  { name: 'claim: no key', method: 'POST', path: '/v1/workers/claim', body: claim({}), key: null },
  {
    name: 'claim: no content type',
    method: 'POST',
    path: '/v1/workers/claim',
    body: claim({}),
    contentType: null,
    key: 'worker',
  },
  {
    name: 'claim: text body',
    method: 'POST',
    path: '/v1/workers/claim',
    body: claim({}),
    contentType: 'text/plain',
    key: 'worker',
  },
  {
    name: 'claim: JSON with a charset',
    method: 'POST',
    path: '/v1/workers/claim',
    body: claim({}),
    contentType: 'application/json; charset=utf-8',
    key: 'worker',
  },
  {
    name: 'claim: no body',
    method: 'POST',
    path: '/v1/workers/claim',
    key: 'worker',
    contentType: 'application/json',
  },
  { name: 'claim: array body', method: 'POST', path: '/v1/workers/claim', body: '[]', key: 'worker' },
  { name: 'claim: missing fields', method: 'POST', path: '/v1/workers/claim', body: '{}', key: 'worker' },
  {
    name: 'claim: unknown field',
    method: 'POST',
    path: '/v1/workers/claim',
    body: claim({ x: 1 }),
    key: 'worker',
  },
  {
    name: 'claim: string number',
    method: 'POST',
    path: '/v1/workers/claim',
    body: claim({ max_jobs: '5' }),
    key: 'worker',
  },
  {
    name: 'claim: max_jobs 33',
    method: 'POST',
    path: '/v1/workers/claim',
    body: claim({ max_jobs: 33 }),
    key: 'worker',
  },
  {
    name: 'claim: null wait',
    method: 'POST',
    path: '/v1/workers/claim',
    body: claim({ wait_seconds: null }),
    key: 'worker',
  },
  {
    name: 'claim: unknown device',
    method: 'POST',
    path: '/v1/workers/claim',
    body: claim({ capabilities: { job_types: ['finetune'], device: 'tpu' } }),
    key: 'worker',
  },
  {
    name: 'claim: query parameter',
    method: 'POST',
    path: '/v1/workers/claim?x=1',
    body: claim({}),
    key: 'worker',
  },
  {
    name: 'heartbeat: no lease token',
    method: 'POST',
    path: '/v1/workers/jobs/JOB/heartbeat',
    body: '{}',
    key: 'worker',
  },
  {
    name: 'heartbeat: empty lease token',
    method: 'POST',
    path: '/v1/workers/jobs/JOB/heartbeat',
    body: json({ lease_token: '' }),
    key: 'worker',
  },
  {
    name: 'heartbeat: bad progress',
    method: 'POST',
    path: '/v1/workers/jobs/JOB/heartbeat',
    body: json({ lease_token: 'lt', progress: { current_step: 'one' } }),
    key: 'worker',
  },
  {
    name: 'heartbeat: id off the pattern',
    method: 'POST',
    path: '/v1/workers/jobs/a.b/heartbeat',
    body: json({ lease_token: 'lt' }),
    key: 'worker',
  },
  {
    name: 'heartbeat: not leased',
    method: 'POST',
    path: '/v1/workers/jobs/JOB/heartbeat',
    body: json({ lease_token: 'lt' }),
    key: 'worker',
  },
  {
    name: 'complete: result not an object',
    method: 'POST',
    path: '/v1/workers/jobs/JOB/complete',
    body: json({ lease_token: 'lt', result: [] }),
    key: 'worker',
  },
  {
    name: 'complete: no result',
    method: 'POST',
    path: '/v1/workers/jobs/JOB/complete',
    body: json({ lease_token: 'lt' }),
    key: 'worker',
  },
  {
    name: 'complete: not leased',
    method: 'POST',
    path: '/v1/workers/jobs/JOB/complete',
    body: json({ lease_token: 'lt', result: {} }),
    key: 'worker',
  },
  {
    name: 'complete batch: empty',
    method: 'POST',
    path: '/v1/workers/jobs/complete',
    body: json({ completions: [] }),
    key: 'worker',
  },
  {
    name: 'complete batch: item without a job',
    method: 'POST',
    path: '/v1/workers/jobs/complete',
    body: json({ completions: [{ lease_token: 'lt', result: {} }] }),
    key: 'worker',
  },
  {
    name: 'complete batch: one not leased',
    method: 'POST',
    path: '/v1/workers/jobs/complete',
    body: json({ completions: [{ job_id: 'JOB', lease_token: 'lt', result: {} }] }),
    key: 'worker',
  },
];

/** The same few bad requests to every bound operation. */
const GENERIC_CASES: Case[] = specOperations()
  .filter((op) => BOUND_OPERATIONS.has(op.operationId))
  .flatMap((op) => {
    const method = op.method.toUpperCase() as Case['method'];
    const path = op.path.replace(/\{\w+\}/, 'JOB');
    const key: Case['key'] = path.startsWith('/v1/workers/') ? 'worker' : 'user';
    const body = method === 'POST' ? '{}' : undefined;
    const cases: Case[] = [
      { name: `${op.operationId}: no key`, method, path, body, key: null },
      { name: `${op.operationId}: unknown query parameter`, method, path: `${path}?zz=1`, body, key },
      { name: `${op.operationId}: id off the pattern`, method, path: path.replace('JOB', 'a.b'), body, key },
    ];
    if (method !== 'POST') return cases;
    return [
      ...cases,
      { name: `${op.operationId}: no content type`, method, path, body, key, contentType: null },
      { name: `${op.operationId}: array body`, method, path, body: '[]', key },
      { name: `${op.operationId}: empty object`, method, path, body, key },
      { name: `${op.operationId}: unknown field`, method, path, body: json({ zz: 1 }), key },
    ];
  });

// Validation does not touch the database beyond the key lookup: PGlite is enough here.
describe('bound validation answers as express-openapi-validator does', () => {
  let server: TestServer;
  let reference: Server;
  let referenceUrl: string;
  let jobId: string;

  beforeAll(async () => {
    server = await startTestServer('pglite', { corsOrigins: [ALLOWED_ORIGIN], maxJsonBytes: MAX_JSON_BYTES });
    reference = createApp(server.ctx, { boundOperations: new Set() }).listen(0, '127.0.0.1');
    await new Promise((resolve) => reference.once('listening', resolve));
    referenceUrl = `http://127.0.0.1:${(reference.address() as AddressInfo).port}`;
    jobId = await createFinetune(server);
  });
  afterAll(async () => {
    await new Promise((resolve) => reference.close(resolve));
    await server?.stop();
  });

  const send = async (base: string, c: Case) => {
    const headers: Record<string, string> = { ...c.headers };
    const key = {
      user: server.key,
      worker: server.workerToken,
      wrong: 'tk_wrong',
      unknown: `tk_unknown_${Math.random()}`,
      null: null,
    }[String(c.key === undefined ? 'user' : c.key)];
    if (key) headers.authorization = `Bearer ${key}`;
    const contentType = c.contentType === undefined ? (c.body ? 'application/json' : null) : c.contentType;
    if (contentType) headers['content-type'] = contentType;
    const res = await fetch(`${base}${c.path.replace('JOB', jobId)}`, {
      method: c.method ?? 'GET',
      headers,
      body: c.body,
    });
    return {
      status: res.status,
      allow: res.headers.get('allow'),
      authenticate: res.headers.get('www-authenticate'),
      contentType: res.headers.get('content-type'),
      etag: res.headers.get('etag'),
      vary: res.headers.get('vary'),
      allowOrigin: res.headers.get('access-control-allow-origin'),
      // a request id the caller gave comes back; a new one differs between the two answers
      requestId: c.headers?.['x-request-id'] ? res.headers.get('x-request-id') : null,
      body: await res.json().catch(() => null),
    };
  };

  it("takes the bound operations' requests past Express's router, and leaves it the rest", async () => {
    const app = createApp(server.ctx);
    // Express's router dispatches each request it gets through `handle` (not in its types).
    const router = app.router as unknown as { handle(...args: unknown[]): void };
    const viaRouter = vi.spyOn(router, 'handle');
    const listening = app.listen(0, '127.0.0.1');
    await new Promise((resolve) => listening.once('listening', resolve));
    const url = `http://127.0.0.1:${(listening.address() as AddressInfo).port}`;
    try {
      expect((await send(url, { name: 'bound', path: '/v1/training/jobs/JOB' })).status).toBe(200);
      expect(viaRouter).not.toHaveBeenCalled();
      expect((await send(url, { name: 'not bound', path: '/v1/training/jobs' })).status).toBe(200);
      expect(viaRouter).toHaveBeenCalledTimes(1);
    } finally {
      await new Promise((resolve) => listening.close(resolve));
    }
  });

  it("gives the server's requests Express's prototypes from birth: the table changes none", async () => {
    const changed = vi.spyOn(Object, 'setPrototypeOf');
    try {
      expect((await send(server.url, { name: 'bound', path: '/v1/training/jobs/JOB' })).status).toBe(200);
      const httpObjects = changed.mock.calls.filter(
        ([target]) => target instanceof IncomingMessage || target instanceof ServerResponse,
      );
      expect(httpObjects).toEqual([]);
    } finally {
      changed.mockRestore();
    }
  });

  it.each([...CASES, ...GENERIC_CASES])('$name', async (c) => {
    const down = c.databaseDown
      ? vi
          .spyOn(server.ctx.knex.client, 'acquireConnection')
          .mockRejectedValue(new Error('connection refused'))
      : undefined;
    try {
      const bound = await send(server.url, c);
      const expected = await send(referenceUrl, c);
      expect(bound).toEqual(expected);
      if (c.databaseDown) expect(bound.status).toBe(500);
    } finally {
      down?.mockRestore();
    }
  });
});

describe('bound validation of responses', () => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer('pglite');
  });
  afterAll(async () => server?.stop());

  it('fails a response its status does not allow, one the spec does not list, and a missing body', async () => {
    const op = specOperations().find((o) => o.operationId === 'getTrainingJob')!;
    const app = express();
    const answers: Record<string, [number, unknown]> = {
      job_wrong_shape: [200, { id: 42 }],
      job_unlisted_status: [418, { error: { code: 'not_found', message: 'x', param: null } }],
      job_listed_error: [404, { error: { code: 'not_found', message: 'x', param: null } }],
      job_no_body: [200, undefined],
      // a 5xx is not validated (nor by express-openapi-validator): the error handler's own shape
      job_unavailable: [503, { unlisted: true }],
    };
    app.get(op.expressPath, boundValidator(server.ctx, op), (req, res) => {
      const [status, body] = answers[req.params.job_id as string]!;
      res.status(status).json(body);
    });
    app.use((err: { status?: number }, _req: Request, res: Response, _next: NextFunction) => {
      res.status(err.status ?? 500).json({ failed: true });
    });
    const listening = app.listen(0, '127.0.0.1');
    await new Promise((resolve) => listening.once('listening', resolve));
    const base = `http://127.0.0.1:${(listening.address() as AddressInfo).port}${op.path.replace('{job_id}', '')}`;
    const statusOf = async (id: string) =>
      (await fetch(`${base}${id}`, { headers: { authorization: `Bearer ${server.key}` } })).status;
    try {
      expect(await statusOf('job_wrong_shape')).toBe(500);
      expect(await statusOf('job_unlisted_status')).toBe(500);
      expect(await statusOf('job_listed_error')).toBe(404);
      expect(await statusOf('job_no_body')).toBe(500);
      expect(await statusOf('job_unavailable')).toBe(503);
    } finally {
      await new Promise((resolve) => listening.close(resolve));
    }
  });
});

describe('the mount-time guard of bound validation', () => {
  it("refuses a keyword it does not implement, wherever it sits, but not a property or an example's key of that name", () => {
    const refused = /bound validation does not implement 'nullable'/;
    expect(() => assertSupported({ type: 'string', nullable: true }, 'op')).toThrow(refused);
    expect(() =>
      assertSupported(
        { type: 'object', properties: { a: { type: 'array', items: { nullable: true } } } },
        'op',
      ),
    ).toThrow(refused);
    expect(() =>
      assertSupported({ type: 'object', properties: { b: { anyOf: [{ nullable: true }] } } }, 'op'),
    ).toThrow(refused);
    expect(() =>
      assertSupported(
        {
          type: 'object',
          properties: { nullable: { type: 'boolean' }, readOnly: { type: 'string' } },
          example: { nullable: true },
          default: { readOnly: 'x' },
        },
        'op',
      ),
    ).not.toThrow();
  });
});
