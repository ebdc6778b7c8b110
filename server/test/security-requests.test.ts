// Hostile request bodies and methods: deep nesting, lone UTF-16 surrogates, methods a path lacks.
// Every one is a 4xx in the error shape, answered before any work (or any copy) is done for it.
import { connect } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loneSurrogatePath, MAX_JSON_DEPTH, nestsDeeperThan } from '../src/json-body.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

/** `[[[…0…]]]`, `depth` arrays deep. */
const nestedArrays = (depth: number) => `${'['.repeat(depth)}0${']'.repeat(depth)}`;
/** `{"a":{"a":…{}…}}`, `depth` objects deep. */
const nestedObjects = (depth: number) => `${'{"a":'.repeat(depth - 1)}{}${'}'.repeat(depth - 1)}`;

describe('nesting scan', () => {
  it('counts objects and arrays, not brackets inside strings', () => {
    expect(nestsDeeperThan(nestedArrays(MAX_JSON_DEPTH), MAX_JSON_DEPTH)).toBe(false);
    expect(nestsDeeperThan(nestedArrays(MAX_JSON_DEPTH + 1), MAX_JSON_DEPTH)).toBe(true);
    expect(nestsDeeperThan(nestedObjects(MAX_JSON_DEPTH + 1), MAX_JSON_DEPTH)).toBe(true);
    const quoted = JSON.stringify({ text: `${'['.repeat(500)}"\\{` });
    expect(nestsDeeperThan(quoted, 2)).toBe(false);
    expect(nestsDeeperThan(Buffer.from(quoted), 2)).toBe(false);
    // Sibling containers do not add up: depth is nesting, not count.
    expect(nestsDeeperThan(JSON.stringify(Array.from({ length: 500 }, () => [[1]])), 3)).toBe(false);
  });

  it('finds a lone surrogate in a value or a key, with its path', () => {
    expect(loneSurrogatePath({ a: ['ok', 'pair \ud83d\ude00'] })).toBeUndefined();
    expect(loneSurrogatePath({ a: [{ b: 'x' }, { b: 'bad \ud800' }] })).toEqual(['a', '1', 'b']);
    expect(loneSurrogatePath({ a: { '\udc00': 1 } })).toEqual(['a']);
  });
});

describe.each(DATABASES)('hostile requests on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(async () => {
    await server?.stop();
  });

  const postRaw = (path: string, body: string, key?: string | null) =>
    server.api(path, { method: 'POST', body, headers: { 'content-type': 'application/json' }, key });

  it('refuses a ~20 KB deeply nested body with 400 before authentication, for any route', async () => {
    for (const body of [nestedArrays(10_000), nestedObjects(4_000)]) {
      for (const key of [null, 'tk_wrong', undefined]) {
        const res = await postRaw('/v1/training/jobs', body, key);
        expect(res.status, await res.clone().text()).toBe(400);
        const { error } = await res.json();
        expect(error).toMatchObject({ code: 'invalid_request', param: null });
        expect(error.message).toMatch(/deeper than 64/);
      }
    }
    // Unknown routes and worker routes parse bodies the same way.
    expect((await postRaw('/v1/nope', nestedArrays(10_000), null)).status).toBe(400);
    expect((await postRaw('/v1/workers/claim', nestedArrays(10_000), server.workerToken)).status).toBe(400);
  });

  it('takes a body nested exactly to the limit (in a free-form field)', async () => {
    // metadata is free-form: the body's own level + 63 of metadata = 64.
    const metadata = JSON.parse(nestedObjects(MAX_JSON_DEPTH - 1));
    const ok = await server.api('/v1/trajectories', { method: 'POST', json: { llm_calls: [], metadata } });
    expect(ok.status, await ok.clone().text()).toBe(201);
    const deeper = { llm_calls: [], metadata: { a: metadata } };
    const refused = await server.api('/v1/trajectories', { method: 'POST', json: deeper });
    expect(refused.status).toBe(400);
  });

  it('refuses deep nesting in UTF-16 bodies too', async () => {
    const res = await server.api('/v1/trajectories', {
      method: 'POST',
      body: Buffer.from(`{"llm_calls":[],"metadata":${nestedArrays(5_000)}}`, 'utf16le'),
      headers: { 'content-type': 'application/json; charset=utf-16le' },
    });
    expect(res.status).toBe(400);
    expect((await res.json()).error.message).toMatch(/deeper than 64/);
  });

  it('refuses strings with lone UTF-16 surrogates with 400 and the path of the field', async () => {
    // Raw JSON text: `\ud800` is an escape JSON allows, but no storable text.
    const body = '{"llm_calls":[{"model":"m","user_prompt":"hi \\ud800 there","response":"ok"}]}';
    const res = await postRaw('/v1/trajectories', body);
    expect(res.status).toBe(400);
    expect((await res.json()).error).toMatchObject({
      code: 'invalid_request',
      param: 'llm_calls.0.user_prompt',
    });

    const inKey = await postRaw('/v1/trajectories', '{"llm_calls":[],"metadata":{"\\udfff":1}}');
    expect(inKey.status).toBe(400);
    expect((await inKey.json()).error.param).toBe('metadata');

    // A well-formed pair (an emoji written as two escapes) is text like any other.
    const pair = await postRaw(
      '/v1/trajectories',
      '{"llm_calls":[{"model":"m","user_prompt":"hi \\ud83d\\ude00","response":"ok"}]}',
    );
    expect(pair.status).toBe(201);
    expect((await pair.json()).llm_calls[0].user_prompt).toBe('hi \u{1f600}');
  });

  it('takes JSON bodies as sent: a wrong type is 400, never coerced (false is not 0)', async () => {
    const before = (await (await server.api('/v1/budget')).json()).limit_usd;
    for (const limit_usd of [false, '12', [3]]) {
      const budget = await server.api('/v1/budget', { method: 'PUT', json: { limit_usd } });
      expect(budget.status, JSON.stringify(limit_usd)).toBe(400);
      expect((await budget.json()).error).toMatchObject({ code: 'invalid_request', param: 'limit_usd' });
    }
    expect((await (await server.api('/v1/budget')).json()).limit_usd).toBe(before);
    const trajectory = await server.api('/v1/trajectories', {
      method: 'POST',
      json: { llm_calls: [], idempotency_key: 5 },
    });
    expect(trajectory.status).toBe(400);
    // Query parameters are text on the wire, and still read as their schema's type.
    expect((await server.api('/v1/trajectories?limit=1')).status).toBe(200);
  });

  it('answers an unauthenticated upload of many GB at once, then closes the connection instead of draining it', async () => {
    const { hostname, port } = new URL(server.url);
    const socket = connect(Number(port), hostname);
    let answer = '';
    socket.on('data', (chunk) => {
      answer += chunk.toString();
    });
    const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    socket.write(
      'POST /v1/datasets HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n' +
        `Content-Length: ${20 * 1024 ** 3}\r\n\r\n--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n`,
    );
    // The body keeps coming, as far as the client is concerned; the server does not wait for it.
    await closed;
    expect(answer).toMatch(/^HTTP\/1\.1 401/);
    expect(answer.toLowerCase()).toContain('connection: close');
  });

  it('answers 405 with an Allow header listing the methods of the path', async () => {
    const put = await server.api('/v1/training/jobs', { method: 'PUT', json: {} });
    expect(put.status).toBe(405);
    expect((await put.json()).error.code).toBe('method_not_allowed');
    expect(put.headers.get('allow')?.split(/,\s*/).sort()).toEqual(['GET', 'POST']);

    const patch = await server.api('/v1/training/jobs/job_0123456789abcdef01234567', { method: 'PATCH' });
    expect(patch.status).toBe(405);
    expect(patch.headers.get('allow')?.split(/,\s*/).sort()).toEqual(['DELETE', 'GET']);

    // A static path is tried before a parameter in the same place: `build` is not a dataset id.
    const build = await server.api('/v1/datasets/build');
    expect(build.status).toBe(405);
    expect(build.headers.get('allow')).toBe('POST');
  });
});
