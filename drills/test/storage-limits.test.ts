/**
 * Drill (c): a server with a tiny upload limit (TUNERY_MAX_UPLOAD_BYTES = 4 KiB) and storage quota
 * (TUNERY_STORAGE_QUOTA_BYTES = 16 KiB). Uploads past either get `413 payload_too_large` in the
 * spec's error shape while the server keeps answering; a job whose checkpoints and outputs cannot be
 * stored ends `failed` with an error that says so instead of hanging; freeing space lets uploads in.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type ApiErrorBody,
  DrillServer,
  isErrorShape,
  killAll,
  printChildrenOnFailure,
  type Schemas,
  spawnWorker,
} from '../src/harness.js';

const MAX_UPLOAD = 4096;
const QUOTA = 16_384;

let server: DrillServer;

beforeAll(async () => {
  server = await DrillServer.start({
    name: 'storage',
    env: {
      TUNERY_MAX_UPLOAD_BYTES: String(MAX_UPLOAD),
      TUNERY_STORAGE_QUOTA_BYTES: String(QUOTA),
      TUNERY_LEASE_SECONDS: '5',
      TUNERY_SWEEP_INTERVAL_MS: '500',
      TUNERY_RETRY_BASE_SECONDS: '1',
    },
  });
  await server.registerTinyModel();
});

afterAll(killAll);

/** JSONL of `{"text"}` lines adding up to about `bytes`. */
function jsonl(bytes: number, tag: string): string {
  const lines: string[] = [];
  let size = 0;
  for (let i = 0; size < bytes; i++) {
    const line = JSON.stringify({ text: `${tag} line ${i}: ${'lorem ipsum '.repeat(4)}` });
    lines.push(line);
    size += line.length + 1;
  }
  return `${lines.join('\n')}\n`;
}

function expect413(res: { status: number; contentType: string; body: unknown; text: string }) {
  expect(res.status, res.text).toBe(413);
  expect(res.contentType).toMatch(/^application\/json/);
  expect(isErrorShape(res.body), res.text).toBe(true);
  expect((res.body as ApiErrorBody).error.code).toBe('payload_too_large');
}

describe('drill: uploads past the limit and the quota', () => {
  it('refuses an oversized dataset upload (multipart and JSONL) with 413 and keeps answering', async () => {
    printChildrenOnFailure();
    const form = new FormData();
    form.set('name', 'too-big');
    form.set('file', new Blob([jsonl(3 * MAX_UPLOAD, 'big')], { type: 'application/jsonl' }), 'big.jsonl');
    expect413(await server.request('POST', '/v1/datasets', { body: form }));
    expect413(
      await server.request('POST', '/v1/datasets', { json: { jsonl: jsonl(2 * MAX_UPLOAD, 'big') } }),
    );

    expect((await server.request('GET', '/v1/health')).status).toBe(200);
    const small = await server.request<Schemas['Dataset']>('POST', '/v1/datasets', {
      json: { name: 'small', train_texts: ['fits easily'] },
    });
    expect(small.status, small.text).toBe(201);
    await server.ok('DELETE', `/v1/datasets/${small.body.id}`);
  });

  it('fails a job whose checkpoints and outputs cannot be stored, with an error that says why', async () => {
    printChildrenOnFailure();
    const job = await server.submitFinetune({ maxSteps: 6, saveSteps: 3, maxAttempts: 2 });
    await spawnWorker(server, 'drill-worker');
    const done = await server.waitTerminal(job.id, 120_000);
    console.info(`job ended ${done.status} after ${done.attempt} attempt(s): ${JSON.stringify(done.error)}`);
    expect(done.status).toBe('failed');
    expect(done.error?.message ?? '').toMatch(/payload_too_large|413/);
    expect(done.finished_at).not.toBeNull();
    const kinds = (await server.events(job.id)).map((e) => e.kind);
    expect(kinds).toContain('failed');
    expect((await server.request('GET', '/v1/health')).status).toBe(200);
  });

  it('refuses uploads once the quota is used up, and takes them again when space is freed', async () => {
    printChildrenOnFailure();
    const created: string[] = [];
    let refused: { status: number; contentType: string; body: unknown; text: string } | undefined;
    for (let i = 0; i < 12 && !refused; i++) {
      const res = await server.request<Schemas['Dataset']>('POST', '/v1/datasets', {
        json: { name: `fill-${i}`, jsonl: jsonl(MAX_UPLOAD - 600, `fill-${i}`) },
      });
      if (res.status === 201) created.push(res.body.id);
      else refused = res;
    }
    expect(created.length, 'some datasets fit before the quota is reached').toBeGreaterThan(0);
    expect(refused, `${created.length} datasets of ~3.5 KB fit in a ${QUOTA}-byte quota`).toBeDefined();
    expect413(refused!);
    expect((refused!.body as ApiErrorBody).error.message).toMatch(/quota/i);
    expect((await server.request('GET', '/v1/health')).status).toBe(200);

    for (const id of created) await server.ok('DELETE', `/v1/datasets/${id}`);
    const again = await server.request('POST', '/v1/datasets', {
      json: { name: 'after-cleanup', jsonl: jsonl(1000, 'again') },
    });
    expect(again.status, again.text).toBe(201);
  });
});
