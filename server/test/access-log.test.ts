// Access logs: one structured line per request with its request id, at `info`; none at all (and no
// pino-http on the request path) when the level leaves them out.
import { Writable } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import { startTestServer, type TestServer } from './harness.js';

function capture() {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString('utf8').split('\n').filter(Boolean)) lines.push(JSON.parse(line));
      done();
    },
  });
  return { stream, lines };
}

describe('access logs', () => {
  let server: TestServer | undefined;
  afterEach(async () => {
    await server?.stop();
    server = undefined;
  });

  it('logs each request once with its request id, status and time', async () => {
    const log = capture();
    server = await startTestServer('pglite', { logLevel: 'info' }, log.stream);
    const res = await server.api('/v1/training/jobs', { headers: { 'x-request-id': 'req_trace_me' } });
    expect(res.headers.get('x-request-id')).toBe('req_trace_me');
    await server.api('/v1/training/jobs/job_nope');
    const access = log.lines.filter((l) => typeof l.responseTime === 'number');
    const mine = access.filter((l) => (l.req as { id?: string } | undefined)?.id === 'req_trace_me');
    expect(mine).toHaveLength(1);
    expect(mine[0]).toMatchObject({ level: 30, res: { statusCode: 200 } });
    expect(access.some((l) => l.level === 40 && (l.res as { statusCode: number }).statusCode === 404)).toBe(
      true,
    );
  });

  it('writes none when the level is error, and still answers with a request id', async () => {
    const log = capture();
    server = await startTestServer('pglite', { logLevel: 'error' }, log.stream);
    const res = await server.api('/v1/training/jobs/job_nope');
    expect(res.status).toBe(404);
    expect(res.headers.get('x-request-id')).toMatch(/^req_/);
    expect(log.lines.filter((l) => typeof l.responseTime === 'number')).toEqual([]);
  });
});
