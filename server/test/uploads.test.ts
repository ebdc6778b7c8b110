/**
 * Uploads and disk: multipart datasets streamed to disk, the quota enforced while bytes arrive
 * (and reserved across concurrent uploads), resumable worker uploads, the part sweeper, file
 * modes, and the request/upload timeouts.
 */
import { createHash } from 'node:crypto';
import { readdir, readFile, rename, stat, utimes, writeFile } from 'node:fs/promises';
import { request as httpRequest } from 'node:http';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createPartSweeper } from '../src/part-sweeper.js';
import { startServer } from '../src/server.js';
import { jsonlLines } from '../src/services/datasets.js';
import { PARTS_DIR } from '../src/storage.js';
import { createFinetune, fakeWorker } from './fake-worker.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

const sha256 = (data: Buffer | string) => createHash('sha256').update(data).digest('hex');

/** JSONL of `{"text", "id"}` lines adding up to about `bytes`. */
function jsonl(bytes: number, tag: string): string {
  const lines: string[] = [];
  for (let i = 0, size = 0; size < bytes; i++) {
    const line = JSON.stringify({ text: `${tag} ${i} ${'lorem ipsum '.repeat(8)}`, id: i });
    lines.push(line);
    size += line.length + 1;
  }
  return `${lines.join('\n')}\n`;
}

function uploadForm(content: string, name = 'upload.jsonl'): FormData {
  const form = new FormData();
  form.append('file', new Blob([content]), name);
  return form;
}

/** Every file under `dir` (none when it does not exist). */
async function filesUnder(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { withFileTypes: true, recursive: true }).catch(() => []);
  return entries.filter((e) => e.isFile()).map((e) => join(e.parentPath, e.name));
}

const partsOf = (server: TestServer) => filesUnder(join(server.dataDir, 'files', PARTS_DIR));

/** A raw request whose body the test writes itself (slowly, or only half of it). */
function rawRequest(server: TestServer, method: string, path: string, headers: Record<string, string>) {
  const url = new URL(server.url);
  const req = httpRequest({ host: url.hostname, port: url.port, method, path, headers });
  const answer = new Promise<{ status: number; body: string }>((resolve, reject) => {
    req.on('response', (res) => {
      let body = '';
      res.on('data', (chunk) => {
        body += chunk;
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
  });
  answer.catch(() => {}); // a request the test cuts off on purpose never answers
  return { req, answer };
}

/** Writes `chunks` one per timer tick of `gapMs`, then ends the body. */
async function trickle(req: ReturnType<typeof httpRequest>, chunks: Buffer[], gapMs: number) {
  for (const chunk of chunks) {
    req.write(chunk);
    await new Promise((resolve) => setTimeout(resolve, gapMs));
  }
  req.end();
}

describe('jsonlLines', () => {
  const lines = async (chunks: string[], max?: number) => {
    const out: string[] = [];
    const source = (async function* () {
      for (const c of chunks) yield Buffer.from(c);
    })();
    for await (const { line } of jsonlLines(source, 'file', max)) out.push(line);
    return out;
  };

  it('splits lines across chunk boundaries, with CRLF, a BOM and no final newline', async () => {
    expect(await lines(['\uFEFF{"a"', ':1}\r\n{"b":2}\n', '\n{"c"', ':3}'])).toEqual([
      '{"a":1}\r',
      '{"b":2}',
      '',
      '{"c":3}',
    ]);
  });

  it('refuses a line longer than the limit, naming it, before buffering the rest', async () => {
    await expect(lines(['{"a":1}\n', 'x'.repeat(6), 'x'.repeat(6)], 10)).rejects.toMatchObject({
      status: 400,
      code: 'invalid_dataset',
      message: 'line 2: longer than 10 bytes.',
    });
  });
});

describe.each(DATABASES)('uploads and disk (%s)', (db) => {
  let server: TestServer;
  const QUOTA = 1024 * 1024;

  beforeAll(async () => {
    server = await startTestServer(db, {
      storageQuotaBytes: QUOTA,
      requestTimeoutSeconds: 1,
      uploadIdleTimeoutSeconds: 2,
    });
    // The validator loads the spec on the first request, for longer than the 2 s idle timeout.
    await server.api('/v1/datasets');
  });
  afterAll(() => server.stop());

  /** Removes every dataset, so each test starts with the whole quota. */
  async function clearDatasets() {
    const list = (await (await server.api('/v1/datasets?limit=100')).json()) as {
      datasets: { id: string }[];
    };
    for (const d of list.datasets) await server.api(`/v1/datasets/${d.id}`, { method: 'DELETE' });
  }

  it('streams a multipart upload to disk as normalized JSONL, with private modes, leaving no part', async () => {
    const content = jsonl(600 * 1024, 'big');
    const res = await server.api('/v1/datasets', { method: 'POST', body: uploadForm(content) });
    expect(res.status, await res.clone().text()).toBe(201);
    const dataset = (await res.json()) as {
      id: string;
      num_examples: number;
      size_bytes: number;
      sha256: string;
    };
    const expectedLines = content.trim().split('\n');
    expect(dataset.num_examples).toBe(expectedLines.length);

    const file = join(server.dataDir, 'files', 'datasets', dataset.id, 'data.jsonl');
    const stored = await readFile(file, 'utf8');
    // extra fields (`id`) are dropped; the row's size and hash are the stored file's
    expect(stored.split('\n')[0]).toBe(JSON.stringify({ text: JSON.parse(expectedLines[0]!).text }));
    expect(dataset.size_bytes).toBe(Buffer.byteLength(stored));
    expect(dataset.sha256).toBe(sha256(stored));
    expect((await stat(file)).mode & 0o777).toBe(0o600);
    expect((await stat(dirname(file))).mode & 0o777).toBe(0o700);
    expect((await stat(join(server.dataDir, 'files'))).mode & 0o777).toBe(0o700);
    expect(await partsOf(server)).toEqual([]);
    await clearDatasets();
  });

  it('a bad line deep in a streamed upload is 400 naming it, and nothing is kept', async () => {
    const content = `${jsonl(200 * 1024, 'ok')}{"text": nope}\n`;
    const res = await server.api('/v1/datasets', { method: 'POST', body: uploadForm(content) });
    expect(res.status).toBe(400);
    const error = ((await res.json()) as { error: { code: string; message: string; param: string } }).error;
    expect(error).toMatchObject({ code: 'invalid_dataset', param: 'file' });
    expect(error.message).toMatch(new RegExp(`^line ${content.trim().split('\n').length}: not valid JSON`));
    expect(await partsOf(server)).toEqual([]);
    expect(await filesUnder(join(server.dataDir, 'files', 'datasets'))).toEqual([]);
  });

  it('bounds the text fields of a multipart form too', async () => {
    const many = uploadForm('{"text":"a"}\n');
    for (let i = 0; i < 20; i++) many.append(`extra${i}`, 'x');
    const tooMany = await server.api('/v1/datasets', { method: 'POST', body: many });
    expect(tooMany.status).toBe(400);
    expect(((await tooMany.json()) as { error: { message: string } }).error.message).toMatch(
      /too many fields/i,
    );
    const long = uploadForm('{"text":"a"}\n');
    long.append('extra', 'n'.repeat(100_000));
    const tooLong = await server.api('/v1/datasets', { method: 'POST', body: long });
    expect(tooLong.status).toBe(400);
    expect(((await tooLong.json()) as { error: { message: string } }).error.message).toMatch(/too long/i);
    // a field the operation does not know is refused, not ignored
    const unknown = uploadForm('{"text":"a"}\n');
    unknown.append('format', 'chat');
    const refused = await server.api('/v1/datasets', { method: 'POST', body: unknown });
    expect(refused.status).toBe(400);
    expect(((await refused.json()) as { error: { param: string } }).error.param).toBe('format');
    expect(await partsOf(server)).toEqual([]);
  });

  it('enforces the quota while the bytes arrive: 413, the partial file removed, the space given back', async () => {
    // empty when it starts, so a check made only before the upload would let it through
    const res = await server.api('/v1/datasets', { method: 'POST', body: uploadForm(jsonl(3 * QUOTA, 'q')) });
    expect(res.status).toBe(413);
    const error = ((await res.json()) as { error: { code: string; message: string } }).error;
    expect(error.code).toBe('payload_too_large');
    expect(error.message).toMatch(/quota/);
    expect(await partsOf(server)).toEqual([]);
    expect(await filesUnder(join(server.dataDir, 'files', 'datasets'))).toEqual([]);

    const small = await server.api('/v1/datasets', {
      method: 'POST',
      body: uploadForm(jsonl(QUOTA / 2, 's')),
    });
    expect(small.status).toBe(201);
    await clearDatasets();
  });

  it('reserves space across concurrent uploads: two that only fit one at a time do not both succeed', async () => {
    const each = Math.floor(QUOTA * 0.6);
    const answers = await Promise.all(
      ['a', 'b'].map((tag) =>
        server.api('/v1/datasets', { method: 'POST', body: uploadForm(jsonl(each, tag)) }),
      ),
    );
    const statuses = answers.map((a) => a.status).sort();
    expect(statuses.filter((s) => s === 201).length).toBeLessThanOrEqual(1);
    expect(statuses.every((s) => s === 201 || s === 413)).toBe(true);
    const stored = await filesUnder(join(server.dataDir, 'files'));
    const total = (await Promise.all(stored.map((f) => stat(f)))).reduce((sum, s) => sum + s.size, 0);
    expect(total).toBeLessThanOrEqual(QUOTA);
    expect(await partsOf(server)).toEqual([]);
    await clearDatasets();
  });

  it('resumes a worker upload cut off midway from the offset the server holds', async () => {
    const worker = fakeWorker(server);
    await createFinetune(server);
    const job = (await worker.claim())!;
    const path = `/v1/workers/jobs/${job.job_id}/outputs/model.safetensors`;
    const lease = { 'x-lease-token': job.lease_token };
    const payload = Buffer.alloc(300 * 1024, 7);
    payload.write('the head', 0);
    const half = payload.length / 2;

    // the connection dies after half the body
    const cut = rawRequest(server, 'PUT', path, {
      authorization: `Bearer ${server.workerToken}`,
      'content-type': 'application/octet-stream',
      'content-length': String(payload.length),
      ...lease,
    });
    await new Promise<void>((resolve) => cut.req.write(payload.subarray(0, half), () => resolve()));
    const part = join(server.dataDir, 'files', PARTS_DIR, 'jobs', job.job_id, 'outputs', 'model.safetensors');
    // the server has written what arrived (the state, not a delay, is awaited)
    for (let size = 0; size < half; )
      size = await stat(part).then(
        (s) => s.size,
        () => 0,
      );
    cut.req.destroy();

    const offset = await server.api(`${path}/offset`, { key: server.workerToken, headers: lease });
    expect(await offset.json()).toEqual({ received_bytes: half });

    const wrongStart = await server.api(path, {
      key: server.workerToken,
      method: 'PUT',
      body: new Uint8Array(payload.subarray(half - 10)),
      headers: {
        ...lease,
        'content-type': 'application/octet-stream',
        'content-range': `bytes ${half - 10}-${payload.length - 1}/${payload.length}`,
      },
    });
    expect(wrongStart.status).toBe(409);
    expect(((await wrongStart.json()) as { error: { code: string } }).error.code).toBe(
      'upload_offset_mismatch',
    );

    const rest = await server.api(path, {
      key: server.workerToken,
      method: 'PUT',
      body: new Uint8Array(payload.subarray(half)),
      headers: {
        ...lease,
        'content-type': 'application/octet-stream',
        'content-range': `bytes ${half}-${payload.length - 1}/${payload.length}`,
      },
    });
    expect(rest.status, await rest.clone().text()).toBe(201);
    expect(await rest.json()).toEqual({
      name: 'model.safetensors',
      size_bytes: payload.length,
      sha256: sha256(payload),
    });
    const stored = join(server.dataDir, 'files', 'jobs', job.job_id, 'outputs', 'model.safetensors');
    expect(sha256(await readFile(stored))).toBe(sha256(payload));
    expect(await partsOf(server)).toEqual([]);

    // A worker whose 201 was lost asks again: the file is answered whole, with its checksum.
    const after = await server.api(`${path}/offset`, { key: server.workerToken, headers: lease });
    expect(await after.json()).toEqual({
      received_bytes: 0,
      stored: { name: 'model.safetensors', size_bytes: payload.length, sha256: sha256(payload) },
    });
    // The next attempt did not store it: it starts from byte 0.
    const released = await server.api(`/v1/workers/jobs/${job.job_id}/release`, {
      key: server.workerToken,
      method: 'POST',
      json: { lease_token: job.lease_token },
    });
    expect(released.status).toBe(200);
    const again = (await worker.claim())!;
    expect(again.job_id).toBe(job.job_id);
    const fresh = await server.api(`${path}/offset`, {
      key: server.workerToken,
      headers: { 'x-lease-token': again.lease_token },
    });
    expect(await fresh.json()).toEqual({ received_bytes: 0 });
    await worker.complete(job.job_id, again.lease_token);
  });

  it('takes a file in chunks (202 each) and refuses a Content-Range the body does not match', async () => {
    const worker = fakeWorker(server);
    await createFinetune(server);
    const job = (await worker.claim())!;
    const path = `/v1/workers/jobs/${job.job_id}/checkpoints/checkpoint-3?step=3`;
    const put = (range: string, bytes: Buffer) =>
      server.api(path, {
        key: server.workerToken,
        method: 'PUT',
        body: new Uint8Array(bytes),
        headers: {
          'x-lease-token': job.lease_token,
          'content-type': 'application/octet-stream',
          'content-range': range,
        },
      });
    const data = Buffer.from('0123456789');
    const first = await put('bytes 0-3/10', data.subarray(0, 4));
    expect(first.status).toBe(202);
    expect(await first.json()).toEqual({ received_bytes: 4 });
    expect((await put('bytes 9-4/10', data.subarray(4))).status).toBe(400);
    // a body shorter than its range is refused, but the bytes it brought are kept
    expect((await put('bytes 4-9/10', data.subarray(4, 8))).status).toBe(400);
    const offset = await server.api(`/v1/workers/jobs/${job.job_id}/checkpoints/checkpoint-3/offset`, {
      key: server.workerToken,
      headers: { 'x-lease-token': job.lease_token },
    });
    expect(await offset.json()).toEqual({ received_bytes: 8 });
    const last = await put('bytes 8-9/10', data.subarray(8));
    expect(last.status).toBe(201);
    expect(((await last.json()) as { sha256: string }).sha256).toBe(sha256(data));
    const other = await server.api(`/v1/workers/jobs/${job.job_id}/checkpoints/checkpoint-3/offset`, {
      key: server.workerToken,
      headers: { 'x-lease-token': 'stale' },
    });
    expect(other.status).toBe(409);
    await worker.complete(job.job_id, job.lease_token);
  });

  it('an upload slower than the request timeout succeeds; an ordinary request that slow gets 408', async () => {
    const worker = fakeWorker(server);
    await createFinetune(server);
    const job = (await worker.claim())!;
    const chunks = Array.from({ length: 8 }, (_, i) => Buffer.alloc(1024, i));
    const slow = rawRequest(server, 'PUT', `/v1/workers/jobs/${job.job_id}/outputs/slow.bin`, {
      authorization: `Bearer ${server.workerToken}`,
      'content-type': 'application/octet-stream',
      'content-length': String(8 * 1024),
      'x-lease-token': job.lease_token,
    });
    const started = Date.now();
    await trickle(slow.req, chunks, 250); // about 2 s, twice the 1 s request timeout
    const answer = await slow.answer;
    expect(Date.now() - started).toBeGreaterThan(1000);
    expect(answer.status, answer.body).toBe(201);
    expect(JSON.parse(answer.body).sha256).toBe(sha256(Buffer.concat(chunks)));

    // the same timeout does apply to ordinary requests: half a JSON body, then nothing
    const stalled = rawRequest(server, 'POST', '/v1/datasets', {
      authorization: `Bearer ${server.key}`,
      'content-type': 'application/json',
      'content-length': '100',
    });
    stalled.req.write('{"train_texts": [');
    const timedOut = await stalled.answer;
    expect(timedOut.status).toBe(408);
    expect(JSON.parse(timedOut.body).error.code).toBe('request_timeout');
    await worker.complete(job.job_id, job.lease_token);
  });

  it('closes an upload idle past the idle timeout and keeps what arrived for a resumed request', async () => {
    const worker = fakeWorker(server);
    await createFinetune(server);
    const job = (await worker.claim())!;
    const idle = rawRequest(server, 'PUT', `/v1/workers/jobs/${job.job_id}/outputs/idle.bin`, {
      authorization: `Bearer ${server.workerToken}`,
      'content-type': 'application/octet-stream',
      'content-length': '2048',
      'x-lease-token': job.lease_token,
    });
    idle.req.write(Buffer.alloc(1024, 1));
    const closed = new Promise<void>((resolve) => idle.req.on('close', () => resolve()));
    idle.req.on('error', () => {});
    await closed; // the server hangs up (after 2 s without a byte)
    const offset = await server.api(`/v1/workers/jobs/${job.job_id}/outputs/idle.bin/offset`, {
      key: server.workerToken,
      headers: { 'x-lease-token': job.lease_token },
    });
    expect(await offset.json()).toEqual({ received_bytes: 1024 });
    await worker.complete(job.job_id, job.lease_token);
  });

  it('a dataset written inside a job create is moved into place once that transaction commits', async () => {
    const jobId = await createFinetune(server, { train_texts: ['inside the create', 'second text'] });
    const job = (await (await server.api(`/v1/training/jobs/${jobId}`)).json()) as { dataset_id: string };
    const final = join(server.dataDir, 'files', 'datasets', job.dataset_id, 'data.jsonl');
    expect(await readFile(final, 'utf8')).toBe('{"text":"inside the create"}\n{"text":"second text"}\n');
    expect(await partsOf(server)).not.toContain(
      join(server.dataDir, 'files', PARTS_DIR, 'datasets', job.dataset_id, 'data.jsonl'),
    );
    // a create that fails after writing its dataset leaves neither the file nor its part
    const before = await filesUnder(join(server.dataDir, 'files', 'datasets'));
    const refused = await server.api('/v1/training/jobs', {
      method: 'POST',
      json: { base_model: 'no-such-model', train_texts: ['x'], max_steps: 1 },
    });
    expect(refused.status).toBeGreaterThanOrEqual(400);
    expect(await filesUnder(join(server.dataDir, 'files', 'datasets'))).toEqual(before);
    await server.api(`/v1/training/jobs/${jobId}/cancel`, { method: 'POST' });
  });

  it('the sweeper removes abandoned parts and finishes a rename a crash interrupted', async () => {
    const sweeper = createPartSweeper(server.ctx, { maxAgeMs: 60_000, intervalMs: 3_600_000 });
    try {
      const partsRoot = join(server.dataDir, 'files', PARTS_DIR);
      const abandoned = join(partsRoot, 'jobs', 'job_gone', 'outputs', 'x.bin');
      const fresh = join(partsRoot, 'jobs', 'job_live', 'outputs', 'y.bin');
      for (const file of [abandoned, fresh]) {
        await server.ctx.storage.mkdirs(dirname(file));
        await writeFile(file, 'partial');
      }
      const anHourAgo = new Date(Date.now() - 3_600_000);
      await utimes(abandoned, anHourAgo, anHourAgo);

      // a dataset whose row committed but whose file never left its part (killed before the rename)
      const res = await server.api('/v1/datasets', { method: 'POST', json: { train_texts: ['kept'] } });
      const { id } = (await res.json()) as { id: string };
      const final = join(server.dataDir, 'files', 'datasets', id, 'data.jsonl');
      const content = await readFile(final, 'utf8');
      const crashed = join(partsRoot, 'datasets', id, 'data.jsonl');
      await server.ctx.storage.mkdirs(dirname(crashed));
      await rename(final, crashed);
      await utimes(crashed, anHourAgo, anHourAgo);

      expect(await sweeper.runOnce()).toEqual({ removed: 1, recovered: 1 });
      expect(await readFile(final, 'utf8')).toBe(content);
      const parts = await partsOf(server);
      expect(parts).toContain(fresh);
      expect(parts).not.toContain(abandoned);
      expect(parts).not.toContain(crashed);
    } finally {
      await sweeper.stop();
      await clearDatasets();
    }
  });
});

describe('at start-up (postgres)', () => {
  it('finishes a rename a crash interrupted and removes abandoned parts before taking requests', async () => {
    const first = await startTestServer('postgres', { uploadPartMaxAgeSeconds: 60 });
    try {
      const res = await first.api('/v1/datasets', { method: 'POST', json: { train_texts: ['survives'] } });
      const { id } = (await res.json()) as { id: string };
      const final = join(first.dataDir, 'files', 'datasets', id, 'data.jsonl');
      const part = join(first.dataDir, 'files', PARTS_DIR, 'datasets', id, 'data.jsonl');
      const abandoned = join(first.dataDir, 'files', PARTS_DIR, 'jobs', 'job_x', 'outputs', 'old.bin');
      await first.close(); // the process ends; its database stays
      // as if it had been killed after the row committed, before the rename
      await first.ctx.storage.mkdirs(dirname(part));
      await rename(final, part);
      await first.ctx.storage.mkdirs(dirname(abandoned));
      await writeFile(abandoned, 'half');
      const longAgo = new Date(Date.now() - 3_600_000);
      await utimes(abandoned, longAgo, longAgo);

      const again = await startServer(first.ctx.config, { inMemory: true, quiet: true });
      try {
        expect(await readFile(final, 'utf8')).toBe('{"text":"survives"}\n');
        expect(await filesUnder(join(first.dataDir, 'files', PARTS_DIR))).toEqual([]);
      } finally {
        await again.close();
      }
    } finally {
      await first.stop();
    }
  });
});
