/**
 * Starting the HTTP server (server.ts): a port another server holds fails the start with the
 * system's error, and leaves the server holding it untouched.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestServer, type TestServer } from './harness.js';

describe('the HTTP server', () => {
  let first: TestServer;
  beforeAll(async () => {
    first = await startTestServer('pglite');
  });
  afterAll(async () => first?.stop());

  it('fails to start on a port another server holds', async () => {
    const { hostname, port } = new URL(first.url);
    await expect(startTestServer('pglite', { host: hostname, port: Number(port) })).rejects.toMatchObject({
      code: 'EADDRINUSE',
    });
    // the first server is untouched
    expect((await first.api('/v1/health', { key: null })).status).toBe(200);
  });
});
