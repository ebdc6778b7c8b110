/**
 * Drill (uploads and disk), on the real server process:
 * - six 90 MB multipart dataset uploads at once keep the server's peak RSS (VmHWM, read once at
 *   the end, so no sampling) to a few hundred MB: files stream to disk, JSONL is parsed per line;
 * - a quota hit mid-upload answers 413, leaves no partial file, and the space is usable again;
 * - an upload slower than the (short, 3 s) request timeout succeeds, while an ordinary request
 *   that slow is cut with 408;
 * - the worker's own client, its connection cut midway through a proxy, resumes the upload from
 *   the server's offset: the resumed request starts there, and the stored file's hash matches.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { connect, createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DrillServer,
  freePort,
  killAll,
  printChildrenOnFailure,
  ROOT,
  type Schemas,
  sleep,
} from '../src/harness.js';

const MB = 1024 * 1024;

/** The server process's peak resident memory so far, bytes (Linux `VmHWM`). */
async function peakRss(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const kb = /^VmHWM:\s+(\d+) kB$/m.exec(status);
  if (!kb) throw new Error(`no VmHWM in /proc/${pid}/status`);
  return Number(kb[1]) * 1024;
}

/** JSONL `{"text"}` lines, generated a batch at a time: about `bytes` in all. */
function* jsonlBatches(bytes: number, tag: string): Generator<Buffer> {
  let sent = 0;
  for (let i = 0; sent < bytes; ) {
    const lines: string[] = [];
    for (let j = 0; j < 2000; j++, i++) {
      lines.push(JSON.stringify({ text: `${tag} line ${i}: ${'lorem ipsum dolor sit amet '.repeat(8)}` }));
    }
    const batch = Buffer.from(`${lines.join('\n')}\n`);
    sent += batch.length;
    yield batch;
  }
}

interface Answer {
  status: number;
  body: string;
}

function answerOf(res: IncomingMessage): Promise<Answer> {
  return new Promise((resolve, reject) => {
    let body = '';
    res.setEncoding('utf8');
    res.on('data', (chunk) => {
      body += chunk;
    });
    res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    res.on('error', reject);
  });
}

/**
 * POSTs a multipart dataset whose file is `batches`, streamed (chunked, with backpressure) so the
 * drill itself never holds a whole file; `gapMs` waits between batches (a slow client).
 */
async function uploadDataset(
  server: DrillServer,
  name: string,
  batches: Iterable<Buffer>,
  gapMs = 0,
): Promise<Answer> {
  const boundary = `drill${randomBytes(8).toString('hex')}`;
  const url = new URL(server.url);
  const req = httpRequest({
    host: url.hostname,
    port: url.port,
    method: 'POST',
    path: '/v1/datasets',
    headers: {
      authorization: `Bearer ${server.adminKey}`,
      'content-type': `multipart/form-data; boundary=${boundary}`,
    },
  });
  const answer = new Promise<Answer>((resolve, reject) => {
    req.on('response', (res) => answerOf(res).then(resolve, reject));
    req.on('error', reject);
  });
  const write = async (data: Buffer | string) => {
    if (!req.write(data)) await Promise.race([once(req, 'drain'), answer]);
  };
  await write(
    `--${boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n${name}\r\n` +
      `--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="${name}.jsonl"\r\n` +
      'Content-Type: application/jsonl\r\n\r\n',
  );
  for (const batch of batches) {
    await write(batch);
    if (gapMs) await sleep(gapMs);
  }
  req.end(`\r\n--${boundary}--\r\n`);
  return answer;
}

async function filesUnder(dir: string): Promise<{ path: string; size: number }[]> {
  const entries = await readdir(dir, { withFileTypes: true, recursive: true }).catch(() => []);
  const files = entries.filter((e) => e.isFile()).map((e) => join(e.parentPath, e.name));
  return Promise.all(files.map(async (path) => ({ path, size: (await stat(path)).size })));
}

afterAll(killAll);

describe('drill: large, concurrent and slow uploads', () => {
  let server: DrillServer;

  beforeAll(async () => {
    server = await DrillServer.start({
      name: 'uploads',
      env: { TUNERY_REQUEST_TIMEOUT_SECONDS: '3', TUNERY_UPLOAD_IDLE_TIMEOUT_SECONDS: '60' },
    });
    await server.ok('GET', '/v1/datasets'); // the validator loads the spec on the first request
  });

  it('takes six 90 MB uploads at once with the server under a few hundred MB of RSS', async () => {
    printChildrenOnFailure();
    const before = await peakRss(server.child.pid);
    const answers = await Promise.all(
      Array.from({ length: 6 }, (_, i) =>
        uploadDataset(server, `big-${i}`, jsonlBatches(90 * MB, `big-${i}`)),
      ),
    );
    const peak = await peakRss(server.child.pid);
    console.info(
      `server VmHWM: ${(before / MB).toFixed(0)} MB before, ${(peak / MB).toFixed(0)} MB after 6 × 90 MB`,
    );
    for (const answer of answers) {
      expect(answer.status, answer.body).toBe(201);
      const dataset = JSON.parse(answer.body) as Schemas['Dataset'];
      expect(dataset.size_bytes).toBeGreaterThan(89 * MB);
      expect(dataset.num_examples).toBeGreaterThan(200_000);
    }
    // The uploads' own share (buffering them would add 540 MB), then the whole: the server starts
    // at 400–465 MB of peak RSS on this machine (node-postgres over PGlite, migrated, validator
    // loaded), and the uploads add 125–155 MB.
    expect(peak - before).toBeLessThan(200 * MB);
    expect(peak).toBeLessThan(650 * MB);
    expect(await filesUnder(join(server.dataDir, 'files', '.uploads'))).toEqual([]);
  });

  it('an upload slower than the request timeout succeeds; an ordinary request that slow gets 408', async () => {
    printChildrenOnFailure();
    // the short timeout is in force: a JSON body that stops halfway is cut after about 3 s
    const url = new URL(server.url);
    const stalled = httpRequest({
      host: url.hostname,
      port: url.port,
      method: 'POST',
      path: '/v1/datasets',
      headers: {
        authorization: `Bearer ${server.adminKey}`,
        'content-type': 'application/json',
        'content-length': '1000',
      },
    });
    const cut = new Promise<Answer>((resolve, reject) => {
      stalled.on('response', (res) => answerOf(res).then(resolve, reject));
      stalled.on('error', reject);
    });
    stalled.write('{"train_texts": [');
    const timedOut = await Promise.race([cut, sleep(30_000).then(() => undefined)]);
    expect(timedOut, 'no answer within 30 s to a request stalled past the 3 s timeout').toBeDefined();
    expect(timedOut!.status).toBe(408);
    expect(JSON.parse(timedOut!.body).error.code).toBe('request_timeout');

    // 12 batches of 100 lines, 600 ms apart: about 7 s, more than twice the timeout
    const batches = Array.from({ length: 12 }, (_, b) =>
      Buffer.from(
        Array.from({ length: 100 }, (_, i) => `${JSON.stringify({ text: `slow ${b}.${i}` })}\n`).join(''),
      ),
    );
    const started = Date.now();
    const slow = await uploadDataset(server, 'slow', batches, 600);
    const seconds = (Date.now() - started) / 1000;
    console.info(`slow upload took ${seconds.toFixed(1)} s against a 3 s request timeout`);
    expect(seconds).toBeGreaterThan(6);
    expect(slow.status, slow.body).toBe(201);
    expect(JSON.parse(slow.body).num_examples).toBe(1200);
  });
});

describe('drill: quota hit mid-upload', () => {
  const QUOTA = 32 * MB;
  let server: DrillServer;

  beforeAll(async () => {
    server = await DrillServer.start({ name: 'quota', env: { TUNERY_STORAGE_QUOTA_BYTES: String(QUOTA) } });
    await server.ok('GET', '/v1/datasets');
  });

  it('refuses at the limit with 413, keeps nothing partial, and takes uploads again', async () => {
    printChildrenOnFailure();
    // nothing is stored yet: a check made only before the upload would take all 100 MB
    const big = await uploadDataset(server, 'too-big', jsonlBatches(100 * MB, 'too-big'));
    expect(big.status, big.body).toBe(413);
    expect(JSON.parse(big.body).error).toMatchObject({ code: 'payload_too_large' });
    expect(JSON.parse(big.body).error.message).toMatch(/quota/);
    const files = await filesUnder(join(server.dataDir, 'files'));
    expect(files, 'no partial file is left').toEqual([]);

    // two uploads that fit one at a time, at once: at most one is stored
    const pair = await Promise.all(
      ['a', 'b'].map((tag) => uploadDataset(server, `pair-${tag}`, jsonlBatches(20 * MB, tag))),
    );
    const statuses = pair.map((a) => a.status);
    expect(statuses.filter((s) => s === 201).length, statuses.join(',')).toBeLessThanOrEqual(1);
    expect(
      statuses.every((s) => s === 201 || s === 413),
      statuses.join(','),
    ).toBe(true);
    const stored = await filesUnder(join(server.dataDir, 'files'));
    expect(stored.reduce((sum, f) => sum + f.size, 0)).toBeLessThanOrEqual(QUOTA);

    for (const answer of pair.filter((a) => a.status === 201)) {
      await server.ok('DELETE', `/v1/datasets/${JSON.parse(answer.body).id}`);
    }
    const again = await uploadDataset(server, 'after', jsonlBatches(10 * MB, 'after'));
    expect(again.status, again.body).toBe(201);
    expect((await server.request('GET', '/v1/health')).status).toBe(200);
  });
});

/** One HTTP request as the proxy saw it go to the server. */
interface SeenRequest {
  head: string;
  contentRange: string | undefined;
  /** Body bytes forwarded to the server. */
  forwarded: number;
}

/**
 * A TCP proxy in front of the server that records each request (head and forwarded body bytes)
 * and cuts the connection of the first PUT after `cutAfter` body bytes.
 */
async function cuttingProxy(target: number, cutAfter: number) {
  const seen: SeenRequest[] = [];
  let cut = false;
  const proxy = createServer((client: Socket) => {
    const upstream = connect(target, '127.0.0.1');
    let buffered = Buffer.alloc(0);
    let current: SeenRequest | undefined;
    let bodyLeft = 0;
    let cutHere = false;
    const hangUp = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('data', (data: Buffer) => {
      if (cutHere) return; // the rest of this connection's bytes never reach the server
      let chunk = data;
      while (chunk.length > 0) {
        if (bodyLeft > 0 && current) {
          let take = Math.min(bodyLeft, chunk.length);
          const cutting = !cut && current.head.startsWith('PUT') && current.forwarded + take >= cutAfter;
          if (cutting) take = cutAfter - current.forwarded;
          upstream.write(chunk.subarray(0, take));
          current.forwarded += take;
          bodyLeft -= take;
          chunk = chunk.subarray(take);
          if (cutting) {
            cut = true;
            cutHere = true;
            // let the forwarded bytes reach the server before the connection dies
            upstream.end(() => setTimeout(hangUp, 200));
            return;
          }
          continue;
        }
        buffered = Buffer.concat([buffered, chunk]);
        const end = buffered.indexOf('\r\n\r\n');
        if (end === -1) return;
        const head = buffered.subarray(0, end).toString('latin1');
        upstream.write(buffered.subarray(0, end + 4));
        chunk = buffered.subarray(end + 4);
        buffered = Buffer.alloc(0);
        const header = (name: string) => new RegExp(`^${name}: *(.*)$`, 'im').exec(head)?.[1]?.trim();
        current = { head: head.split('\r\n')[0]!, contentRange: header('content-range'), forwarded: 0 };
        seen.push(current);
        bodyLeft = Number(header('content-length') ?? 0);
      }
    });
    // after the cut the client must see a dead connection, not the server's late answer
    upstream.on('data', (data) => {
      if (!cutHere) client.write(data);
    });
    client.on('error', hangUp);
    upstream.on('error', hangUp);
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
  });
  const port = await freePort();
  await new Promise<void>((resolve) => proxy.listen(port, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${port}`, seen, close: () => proxy.close() };
}

/** Runs the worker's client (`WorkerClient.upload_output`) in the worker's virtualenv. */
async function workerUpload(url: string, token: string, jobId: string, lease: string, path: string) {
  const script = `
import json, sys
from pathlib import Path
from tunery_worker.client import RetryPolicy, WorkerClient
url, token, job, lease, path = sys.argv[1:]
client = WorkerClient(url, token, retry=RetryPolicy(initial_delay=0.05, retry_seconds=60))
print(json.dumps(client.upload_output(job, lease, "model.safetensors", Path(path))))
`;
  const proc = spawn(join(ROOT, '.venv/bin/python'), ['-c', script, url, token, jobId, lease, path], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  proc.stdout.on('data', (d) => {
    out += d;
  });
  proc.stderr.on('data', (d) => {
    err += d;
  });
  const [code] = (await once(proc, 'exit')) as [number];
  if (code !== 0) throw new Error(`worker upload exited ${code}:\n${err}`);
  return { stored: JSON.parse(out.trim().split('\n').at(-1)!) as Schemas['StoredFile'], log: err };
}

describe('drill: a worker upload cut off midway resumes', () => {
  let server: DrillServer;

  beforeAll(async () => {
    server = await DrillServer.start({ name: 'resume' });
    await server.registerTinyModel();
  });

  it('continues from the offset the server holds; the stored file is the file', async () => {
    printChildrenOnFailure();
    const job = await server.submitFinetune({ maxSteps: 1, saveSteps: 1 });
    const claim = await fetch(`${server.url}/v1/workers/claim`, {
      method: 'POST',
      headers: { authorization: `Bearer ${server.workerToken}`, 'content-type': 'application/json' },
      body: JSON.stringify({
        worker_id: 'drill-uploader',
        capabilities: { job_types: ['finetune'], methods: ['lora'], device: 'cpu' },
        wait_seconds: 10,
      }),
    });
    expect(claim.status).toBe(200);
    const { job: claimed } = (await claim.json()) as Schemas['ClaimResponse'];
    expect(claimed.job_id).toBe(job.id);

    const size = 24 * MB + 12_345;
    const payload = randomBytes(size);
    const path = join(server.dir, 'model.safetensors');
    await writeFile(path, payload);
    const proxy = await cuttingProxy(server.port, 10 * MB);
    try {
      const { stored, log } = await workerUpload(
        proxy.url,
        server.workerToken,
        claimed.job_id,
        claimed.lease_token,
        path,
      );
      const sha = createHash('sha256').update(payload).digest('hex');
      expect(stored).toEqual({ name: 'model.safetensors', size_bytes: size, sha256: sha });
      expect(log).toMatch(/resuming/);

      const puts = proxy.seen.filter((r) => r.head.startsWith('PUT'));
      console.info(puts.map((r) => `${r.head} [${r.contentRange}] ${r.forwarded} bytes`).join('\n'));
      expect(puts).toHaveLength(2);
      expect(puts[0]!.contentRange).toBe(`bytes 0-${size - 1}/${size}`);
      expect(puts[0]!.forwarded).toBe(10 * MB);
      expect(proxy.seen.some((r) => r.head.startsWith('GET') && r.head.includes('/offset'))).toBe(true);
      // the resumed request starts where the server's bytes end and sends only the rest
      const resumedAt = Number(/^bytes (\d+)-/.exec(puts[1]!.contentRange ?? '')?.[1]);
      expect(resumedAt).toBeGreaterThan(0);
      expect(resumedAt).toBeLessThanOrEqual(10 * MB);
      expect(puts[1]!.contentRange).toBe(`bytes ${resumedAt}-${size - 1}/${size}`);
      expect(puts[1]!.forwarded).toBe(size - resumedAt);

      const outputs = await server.ok<Schemas['OutputList']>('GET', `/v1/training/jobs/${job.id}/output`);
      const file = outputs.files.find((f) => f.name === 'model.safetensors');
      expect(file).toMatchObject({ size_bytes: size, sha256: sha });
    } finally {
      proxy.close();
    }
  });
});
