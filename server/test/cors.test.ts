import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestServer, type TestServer } from './harness.js';

const PAGE = 'https://app.example.com';

describe('CORS (TUNERY_CORS_ORIGINS)', () => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer('pglite', { corsOrigins: [PAGE] });
  });
  afterAll(async () => {
    await server?.stop();
  });

  it('answers a listed origin’s preflight with the methods and headers the SDK sends', async () => {
    const res = await server.api('/v1/training/jobs', {
      method: 'OPTIONS',
      key: null,
      headers: {
        origin: PAGE,
        'access-control-request-method': 'POST',
        'access-control-request-headers':
          'authorization, content-type, idempotency-key, x-tunery-retry-count, x-team',
      },
    });
    expect(res.status).toBe(204);
    expect(res.headers.get('access-control-allow-origin')).toBe(PAGE);
    expect(res.headers.get('access-control-allow-methods')).toContain('POST');
    const allowed = res.headers.get('access-control-allow-headers')?.toLowerCase() ?? '';
    for (const header of [
      'authorization',
      'content-type',
      'idempotency-key',
      'x-tunery-retry-count',
      'x-team',
    ]) {
      expect(allowed).toContain(header);
    }
  });

  it('lets a listed origin read answers, errors included, with the request id', async () => {
    const ok = await server.api('/v1/training/jobs', { headers: { origin: PAGE } });
    expect(ok.status).toBe(200);
    expect(ok.headers.get('access-control-allow-origin')).toBe(PAGE);
    expect(ok.headers.get('vary')).toMatch(/origin/i);
    expect(ok.headers.get('access-control-expose-headers')).toMatch(/x-request-id/i);
    const unauthorized = await server.api('/v1/training/jobs', { key: null, headers: { origin: PAGE } });
    expect(unauthorized.status).toBe(401);
    expect(unauthorized.headers.get('access-control-allow-origin')).toBe(PAGE);
  });

  it('allows no other origin', async () => {
    const res = await server.api('/v1/training/jobs', { headers: { origin: 'https://evil.example' } });
    expect(res.status).toBe(200);
    expect(res.headers.get('access-control-allow-origin')).toBeNull();
    // caches must not hand this answer to a listed origin
    expect(res.headers.get('vary')).toMatch(/origin/i);
    const preflight = await server.api('/v1/training/jobs', {
      method: 'OPTIONS',
      key: null,
      headers: { origin: 'https://evil.example', 'access-control-request-method': 'POST' },
    });
    expect(preflight.status).toBeLessThan(500);
    expect(preflight.headers.get('access-control-allow-origin')).toBeNull();
  });
});
