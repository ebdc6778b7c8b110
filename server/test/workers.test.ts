import { createHash } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { newId } from '../src/ids.js';
import { enqueueJob } from '../src/queue/enqueue.js';
import { leasedJobs } from '../src/queue/leased-jobs.js';
import { LocalStorage } from '../src/storage.js';
import { createFinetune, fakeWorker, sleep } from './fake-worker.js';
import { finetuneInput } from './fixtures.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

const sha256 = (data: Buffer) => createHash('sha256').update(data).digest('hex');

describe('upload storage with a quota', () => {
  it('answers concurrent uploads with success or 413, never an error from the temp files of others', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tunery-quota-'));
    try {
      const storage = new LocalStorage(dir, 1e9, 100 * 1024);
      // Slow streams keep many temp files appearing and being renamed while others measure usage.
      const slow = (kib: number) =>
        Readable.from(
          (async function* () {
            for (let i = 0; i < kib; i++) {
              yield Buffer.alloc(1024);
              await new Promise((resolve) => setImmediate(resolve));
            }
          })(),
        );
      const outcomes = await Promise.all(
        Array.from({ length: 200 }, (_, i) =>
          storage.put(['jobs', 'job_x', 'outputs', `f${i}`], slow(1 + (i % 7))).then(
            () => 'stored',
            (err: { status?: number; code?: string }) => (err.status === 413 ? '413' : String(err.code)),
          ),
        ),
      );
      expect(outcomes.filter((o) => o !== 'stored' && o !== '413')).toEqual([]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe.each(DATABASES)('worker protocol on %s', (db) => {
  let server: TestServer;
  let worker: ReturnType<typeof fakeWorker>;
  beforeAll(async () => {
    // A small JSON limit proves uploads are streamed, not parsed as bodies.
    server = await startTestServer(db, { maxJsonBytes: 64 * 1024 });
    worker = fakeWorker(server);
  });
  afterAll(async () => {
    await server?.stop();
  });

  /** Ends every live job, so each test claims only what it created. */
  const clearQueue = () =>
    server.ctx.knex('jobs').whereIn('status', ['pending', 'running']).update({ status: 'cancelled' });

  it('runs a full lifecycle: claim, report, upload, complete, then everything is readable', async () => {
    await clearQueue();
    const id = await createFinetune(server, { output_name: 'lifecycle', hf_token: 'hf_x', max_steps: 4 });
    const job = (await worker.claim())!;
    expect(job).toMatchObject({
      job_id: id,
      kind: 'training',
      type: 'finetune',
      attempt: 1,
      log_seq: 0,
      lease_seconds: 60,
      resume_from: null,
    });
    expect(job.spec).toMatchObject({
      method: 'lora',
      base_model: { name: 'smollm2-135m-instruct', source: 'HuggingFaceTB/SmolLM2-135M-Instruct' },
      output_name: 'lifecycle',
      seed: 42,
      dataset_format: 'text',
      hf_token: 'hf_x',
      lora: { r: 16, alpha: 32 },
      training: { max_steps: 4, save_steps: 500 },
      distributed: { enabled: false, num_nodes: 1 },
    });
    expect(job.inputs).toHaveLength(1);
    expect(job.inputs[0]).toMatchObject({ role: 'dataset', name: 'data.jsonl' });
    const dataset = await worker.download(job.inputs[0]!.download_url, job.lease_token);
    expect(await dataset.text()).toBe('{"text":"hello world"}\n{"text":"good night"}\n');
    const token = job.lease_token;

    const started = await (await server.api(`/v1/training/jobs/${id}`)).json();
    expect(started).toMatchObject({ status: 'running', phase: 'initializing', attempt: 1 });
    expect(started.started_at).not.toBeNull();

    const events = await worker.events(id, token, {
      phase: 'training',
      progress: { current_step: 2, total_steps: 4, current_loss: 1.25, learning_rate: 0.0002 },
      events: [{ kind: 'model_loaded', ts: '2026-01-01T00:00:00Z', payload: { params: 10 } }],
    });
    expect(await events.json()).toEqual({ accepted: 2, cancel_requested: false });
    const again = await worker.events(id, token, {
      phase: 'training',
      events: [{ kind: 'model_loaded', ts: '2026-01-01T00:00:00Z', payload: { params: 10 } }],
    });
    expect(await again.json()).toEqual({ accepted: 0, cancel_requested: false });

    const lines = [1, 2, 3, 4, 5].map((seq) => ({ seq, text: `step ${seq}`, ts: '2026-01-01T00:00:01Z' }));
    expect(await (await worker.logs(id, token, lines)).json()).toEqual({
      accepted: 5,
      cancel_requested: false,
    });
    expect(await (await worker.logs(id, token, lines.slice(3))).json()).toEqual({
      accepted: 0,
      cancel_requested: false,
    });
    const points = [1, 2, 3, 4].map((step) => ({
      step,
      phase: 'train',
      loss: 2 - step / 4,
      lr: 0.0002,
      grad_norm: 1,
    }));
    expect(await (await worker.metrics(id, token, points)).json()).toEqual({
      accepted: 4,
      cancel_requested: false,
    });
    expect(
      await (await worker.metrics(id, token, [...points, { step: 4, phase: 'eval', eval_loss: 1.1 }])).json(),
    ).toEqual({ accepted: 1, cancel_requested: false });
    const heartbeat = await worker.heartbeat(id, token, { current_step: 3 });
    expect(await heartbeat.json()).toMatchObject({ cancel_requested: false });

    const running = await (await server.api(`/v1/training/jobs/${id}`)).json();
    expect(running).toMatchObject({
      phase: 'training',
      current_step: 3,
      total_steps: 4,
      progress: 75,
      current_loss: 1.25,
      learning_rate: 0.0002,
    });
    expect(running.metrics).toMatchObject({ train_loss: 1, eval_loss: 1.1 });

    const checkpoint = Buffer.from('checkpoint bytes');
    const cp = await worker.upload(id, token, 'checkpoints', 'checkpoint-2', checkpoint, 2);
    expect(cp.status).toBe(201);
    expect(await cp.json()).toEqual({
      name: 'checkpoint-2',
      size_bytes: checkpoint.length,
      sha256: sha256(checkpoint),
    });
    const weights = Buffer.alloc(200 * 1024, 7); // larger than the JSON limit
    weights.write('adapter');
    expect((await worker.upload(id, token, 'outputs', 'adapter_model.safetensors', weights)).status).toBe(
      201,
    );
    expect(
      (await worker.upload(id, token, 'outputs', 'adapter_config.json', Buffer.from('{"r":16}'))).status,
    ).toBe(201);

    const done = await worker.complete(id, token, {
      loss_final: 0.5,
      params_before: 1000,
      params_after: 1000,
      params_trainable: 10,
      tokens_processed: 2048,
      gpu_seconds: 12.5,
      steps: 4,
      adapter: { name: 'lifecycle', size_bytes: weights.length },
    });
    expect(await done.json()).toMatchObject({ job_id: id, status: 'completed', will_retry: false });
    expect((await worker.complete(id, token, {})).status).toBe(200); // a retried complete is answered, not refused

    const finished = await (await server.api(`/v1/training/jobs/${id}`)).json();
    expect(finished).toMatchObject({
      status: 'completed',
      phase: 'done',
      progress: 100,
      adapter_name: 'lifecycle',
      last_checkpoint_step: 2,
    });
    expect(finished.output_model_id).toMatch(/^model_/);
    expect(finished.adapter_path).toBe(`files/jobs/${id}/outputs`);
    expect(finished.completed_at).toBe(finished.finished_at);

    const result = await (await server.api(`/v1/training/jobs/${id}/result`)).json();
    expect(result).toMatchObject({
      job_id: id,
      loss_final: 0.5,
      params_delta: 0,
      tokens_processed: 2048,
      gpu_seconds: 12.5,
      ppl_final: null,
    });
    expect(result.cost_usd).toBeGreaterThanOrEqual(0);

    const output = await (await server.api(`/v1/training/jobs/${id}/output`)).json();
    expect(output).toMatchObject({ job_id: id, status: 'completed', total_files: 2 });
    expect(output.files.map((f: { name: string }) => f.name)).toEqual([
      'adapter_config.json',
      'adapter_model.safetensors',
    ]);
    const file = output.files[1];
    expect(file).toMatchObject({
      size_bytes: weights.length,
      sha256: sha256(weights),
      download_url: `/v1/training/jobs/${id}/output/adapter_model.safetensors`,
    });
    expect(file.path).toBe(`files/jobs/${id}/outputs/adapter_model.safetensors`);
    expect(JSON.stringify(output)).not.toContain(server.dataDir);

    const whole = await server.api(file.download_url);
    expect(whole.status).toBe(200);
    expect(whole.headers.get('etag')).toBe(`"${sha256(weights)}"`);
    expect(whole.headers.get('accept-ranges')).toBe('bytes');
    expect(Buffer.from(await whole.arrayBuffer()).equals(weights)).toBe(true);
    const part = await server.api(file.download_url, { headers: { range: 'bytes=0-6' } });
    expect(part.status).toBe(206);
    expect(part.headers.get('content-range')).toBe(`bytes 0-6/${weights.length}`);
    expect(await part.text()).toBe('adapter');
    const tail = await server.api(file.download_url, { headers: { range: 'bytes=-3' } });
    expect((await tail.arrayBuffer()).byteLength).toBe(3);
    const outside = await server.api(file.download_url, { headers: { range: `bytes=${weights.length}-` } });
    expect(outside.status).toBe(416);
    expect(outside.headers.get('content-range')).toBe(`bytes */${weights.length}`);
    expect((await outside.json()).error.code).toBe('range_not_satisfiable');
    expect((await server.api(`/v1/training/jobs/${id}/output/nope.bin`)).status).toBe(404);

    const since = await (await server.api(`/v1/training/jobs/${id}/logs?since=3`)).json();
    expect(since.latest_seq).toBe(5);
    expect(since.lines.map((l: { seq: number }) => l.seq)).toEqual([4, 5]);
    expect(since.lines[0]).toMatchObject({
      stream: 'stdout',
      text: 'step 4',
      ts: '2026-01-01T00:00:01.000Z',
    });
    const tailLines = await (await server.api(`/v1/training/jobs/${id}/logs?tail=2`)).json();
    expect(tailLines.lines.map((l: { seq: number }) => l.seq)).toEqual([4, 5]);

    const metrics = await (await server.api(`/v1/training/jobs/${id}/metrics?since_step=2`)).json();
    expect(metrics).toMatchObject({ job_id: id, count: 3, latest_step: 4 });
    expect(metrics.points.map((p: { step: number; phase: string }) => `${p.step}${p.phase}`)).toEqual([
      '3train',
      '4train',
      '4eval',
    ]);
    expect(metrics.points[0]).toMatchObject({ loss: 1.25, lr: 0.0002, grad_norm: 1 });
    const limited = await (await server.api(`/v1/training/jobs/${id}/metrics?limit=1`)).json();
    expect(limited.points.map((p: { step: number }) => p.step)).toEqual([1]);

    const timeline = await (await server.api(`/v1/training/jobs/${id}/events`)).json();
    const kinds = timeline.events.map((e: { kind: string }) => e.kind);
    expect(kinds).toEqual(['created', 'claimed', 'model_loaded', 'phase', 'checkpoint', 'completed']);
    const seqs = timeline.events.map((e: { seq: number }) => e.seq);
    expect([...seqs].sort((a, b) => a - b)).toEqual(seqs);
    const later = await (await server.api(`/v1/training/jobs/${id}/events?since=${seqs[3]}`)).json();
    expect(later.events.map((e: { kind: string }) => e.kind)).toEqual(['checkpoint', 'completed']);

    const checkpoints = await (await server.api(`/v1/training/jobs/${id}/checkpoints`)).json();
    expect(checkpoints.checkpoints).toEqual([
      { name: 'checkpoint-2', step: 2, size_bytes: checkpoint.length, created_at: expect.any(String) },
    ]);
  });

  it('delivers a cancel through the heartbeat answer; the acknowledgement ends it cancelled', async () => {
    await clearQueue();
    const id = await createFinetune(server);
    const job = (await worker.claim())!;
    expect((await worker.cancelled(id, job.lease_token)).status).toBe(409); // nobody asked yet
    const cancel = await server.api(`/v1/training/jobs/${id}/cancel`, { method: 'POST' });
    expect(await cancel.json()).toMatchObject({ status: 'running', cancel_requested: true });
    expect(await (await worker.heartbeat(id, job.lease_token)).json()).toMatchObject({
      cancel_requested: true,
    });
    // Report answers carry the cancel too, so a worker learns of it within one flush.
    const lines = [{ seq: 1, text: 'step 1' }];
    expect(await (await worker.logs(id, job.lease_token, lines)).json()).toMatchObject({
      cancel_requested: true,
    });
    await worker.upload(id, job.lease_token, 'outputs', 'partial.bin', Buffer.from('partial'));
    const ack = await worker.cancelled(id, job.lease_token);
    expect(await ack.json()).toMatchObject({ job_id: id, status: 'cancelled' });
    const after = await (await server.api(`/v1/training/jobs/${id}`)).json();
    expect(after).toMatchObject({ status: 'cancelled' });
    expect(after.finished_at).not.toBeNull();
    const output = await (await server.api(`/v1/training/jobs/${id}/output`)).json();
    expect(output.files.map((f: { name: string }) => f.name)).toEqual(['partial.bin']);
    expect((await worker.heartbeat(id, job.lease_token)).status).toBe(409);
  });

  it("records a worker's new capabilities at its next claim, however soon it comes", async () => {
    await clearQueue();
    const capabilitiesOf = async () =>
      (await server.ctx.knex('workers').where({ id: 'worker-1' }).first('capabilities')).capabilities;
    expect(await worker.claim({ job_types: ['finetune'], device: 'cpu' })).toBeNull();
    expect(await capabilitiesOf()).toEqual({ job_types: ['finetune'], device: 'cpu' });
    // the claims of a busy worker are not each written; a change of what it can do is
    expect(
      await worker.claim({ job_types: ['finetune', 'merge'], methods: ['lora'], device: 'cpu' }),
    ).toBeNull();
    expect(await capabilitiesOf()).toEqual({
      job_types: ['finetune', 'merge'],
      methods: ['lora'],
      device: 'cpu',
    });
  });

  it('counts a worker busy with a long job as online: its heartbeats are seen', async () => {
    await clearQueue();
    const id = await createFinetune(server);
    const job = (await worker.claim())!;
    const online = async () => (await (await server.api('/v1/training/status')).json()).workers_online;
    // Long after its claim (it claims nothing while it trains)…
    await server.ctx.knex('workers').update({ last_seen_at: new Date(Date.now() - 3600_000) });
    expect(await online()).toBe(0);
    // …its heartbeat says it is there.
    expect((await worker.heartbeat(id, job.lease_token)).status).toBe(200);
    expect(await online()).toBe(1);
    await worker.complete(id, job.lease_token);
  });

  it("takes what a result leaves out of an adapter's metrics from the job's progress at completion", async () => {
    await clearQueue();
    const id = await createFinetune(server, { output_name: 'progress-metrics', max_steps: 4 });
    const job = (await worker.claim())!;
    const progress = { current_step: 2, total_steps: 4, current_loss: 1.25 };
    expect((await worker.events(id, job.lease_token, { phase: 'training', progress })).status).toBe(200);
    expect((await worker.complete(id, job.lease_token, { train_seconds: 90 })).status).toBe(200);
    const adapter = await (await server.api('/v1/adapters/progress-metrics')).json();
    // completion moves the step counter to the planned total, and the metrics show it
    expect(adapter.metrics).toEqual({ final_loss: 1.25, training_steps: 4, training_time_minutes: 1.5 });
  });

  it('forgets what it kept of a lease for its completion once the lease ends otherwise', async () => {
    await clearQueue();
    const id = await createFinetune(server);
    const kept = (token: string) => leasedJobs.get(server.ctx.knex, id, token);
    const claimed = async () => {
      const job = (await worker.claim())!;
      expect(kept(job.lease_token)).toMatchObject({ id });
      return job.lease_token;
    };
    const post = (path: string, token: string) =>
      server.api(`/v1/workers/jobs/${id}/${path}`, {
        key: server.workerToken,
        method: 'POST',
        json: { lease_token: token },
      });
    const released = await claimed();
    expect((await post('release', released)).status).toBe(200);
    expect(kept(released)).toBeUndefined();
    const failed = await claimed();
    expect((await worker.fail(id, failed, { code: 'oom', message: 'OOM' }, true)).status).toBe(200);
    expect(kept(failed)).toBeUndefined();
    await server.ctx
      .knex('jobs')
      .where({ id })
      .update({ run_at: server.ctx.knex.raw('now()') });
    const cancelled = await claimed();
    expect((await server.api(`/v1/training/jobs/${id}/cancel`, { method: 'POST' })).status).toBe(200);
    expect((await worker.cancelled(id, cancelled)).status).toBe(200);
    expect(kept(cancelled)).toBeUndefined();
  });

  it('puts a retryable failure back with backoff and ends a final one failed', async () => {
    await clearQueue();
    const id = await createFinetune(server);
    const job = (await worker.claim())!;
    const retry = await (
      await worker.fail(id, job.lease_token, { code: 'out_of_memory', message: 'OOM' }, true)
    ).json();
    expect(retry).toMatchObject({ status: 'pending', will_retry: true });
    expect(new Date(retry.run_at).getTime()).toBeGreaterThan(Date.now() + 5_000);
    expect(await worker.claim()).toBeNull();
    await server.ctx
      .knex('jobs')
      .where({ id })
      .update({ run_at: server.ctx.knex.raw('now()') });
    const second = (await worker.claim())!;
    expect(second.attempt).toBe(2);
    const final = await (
      await worker.fail(id, second.lease_token, { code: 'invalid_config', message: 'bad' }, false)
    ).json();
    expect(final).toMatchObject({ status: 'failed', will_retry: false, run_at: null });
    expect(await (await server.api(`/v1/training/jobs/${id}`)).json()).toMatchObject({
      status: 'failed',
      error: { code: 'invalid_config', message: 'bad' },
      error_message: 'bad',
    });
  });

  it('hands out only what the worker can run, and long-polls until a job arrives', async () => {
    await clearQueue();
    // a qlora job is only accepted while a CUDA worker that runs it is online
    await server.ctx.knex('workers').insert({
      id: 'gpu-online',
      capabilities: JSON.stringify({ job_types: ['finetune'], device: 'cuda' }),
    });
    await createFinetune(server, { method: 'qlora' });
    await server.ctx.knex('workers').where({ id: 'gpu-online' }).delete();
    expect(await worker.claim({ job_types: ['finetune'], methods: ['lora'], device: 'cpu' })).toBeNull();
    expect(await worker.claim({ job_types: ['distill'], device: 'cpu' })).toBeNull();
    await clearQueue();

    const started = Date.now();
    const waiting = worker.claim({ job_types: ['finetune'], device: 'cpu' }, 10);
    await sleep(300);
    const id = await createFinetune(server);
    const job = await waiting;
    expect(job?.job_id).toBe(id);
    expect(Date.now() - started).toBeLessThan(5_000);

    const idle = Date.now();
    expect(await worker.claim({ job_types: ['contract'], device: 'cpu' }, 1)).toBeNull();
    expect(Date.now() - idle).toBeGreaterThanOrEqual(900);
    const seen = await server.ctx.knex('workers').where({ id: 'worker-1' }).first();
    expect(seen.capabilities).toMatchObject({ job_types: ['contract'] });
  });

  it('fails a job whose source model or dataset was deleted, and hands out the next one', async () => {
    await clearQueue();
    const orphan = (extra: { modelId?: string; datasetId?: string }) =>
      enqueueJob(server.ctx, server.ctx.knex, {
        ...finetuneInput(),
        // ahead of the runnable job, so the claim meets them first
        priority: 90,
        ...extra,
      });
    const noModel = await orphan({ modelId: 'model_deleted' });
    const noDataset = await orphan({ datasetId: 'ds_deleted' });
    const runnable = await createFinetune(server);
    const claimed = (await worker.claim())!;
    expect(claimed.job_id).toBe(runnable);
    const rows = await server.ctx.knex('jobs').whereIn('id', [noModel.id, noDataset.id]);
    const byId = new Map(rows.map((r) => [r.id, r]));
    expect(byId.get(noModel.id)).toMatchObject({ status: 'failed', error_code: 'invalid_config' });
    expect(byId.get(noModel.id).error_message).toMatch(/source model model_deleted was deleted/);
    expect(byId.get(noDataset.id)).toMatchObject({ status: 'failed', error_code: 'invalid_config' });
    expect(byId.get(noDataset.id).error_message).toMatch(/dataset ds_deleted was deleted/);
  });

  it('refuses malformed reports with the field named', async () => {
    await clearQueue();
    const id = await createFinetune(server);
    const job = (await worker.claim())!;
    const post = (path: string, json: unknown) =>
      server.api(path, { key: server.workerToken, method: 'POST', json });
    const cases: [string, unknown, string][] = [
      ['/v1/workers/claim', { capabilities: { job_types: ['finetune'], device: 'cpu' } }, 'worker_id'],
      [
        '/v1/workers/claim',
        { worker_id: 'w', capabilities: { job_types: ['finetune'], device: 'tpu' } },
        'capabilities.device',
      ],
      [
        '/v1/workers/claim',
        { worker_id: 'w', capabilities: { job_types: [], device: 'cpu' } },
        'capabilities.job_types',
      ],
      [
        '/v1/workers/claim',
        { worker_id: 'w', capabilities: { job_types: ['finetune'], device: 'cpu' }, wait_seconds: 31 },
        'wait_seconds',
      ],
      [`/v1/workers/jobs/${id}/heartbeat`, {}, 'lease_token'],
      [
        `/v1/workers/jobs/${id}/logs`,
        { lease_token: job.lease_token, lines: [{ seq: 0, text: 'x' }] },
        'lines.0.seq',
      ],
      [
        `/v1/workers/jobs/${id}/metrics`,
        { lease_token: job.lease_token, points: [{ step: 1, phase: 'test' }] },
        'points.0.phase',
      ],
      [`/v1/workers/jobs/${id}/events`, { lease_token: job.lease_token, phase: 'dancing' }, 'phase'],
      [
        `/v1/workers/jobs/${id}/fail`,
        { lease_token: job.lease_token, error: { code: 'x' } },
        'error.message',
      ],
      [`/v1/workers/jobs/${id}/complete`, { lease_token: job.lease_token, result: 'done' }, 'result'],
    ];
    for (const [path, body, param] of cases) {
      const res = await post(path, body);
      const error = (await res.json()).error;
      expect({ path, status: res.status, param: error.param }).toEqual({ path, status: 400, param });
    }
    const noStep = await server.api(`/v1/workers/jobs/${id}/checkpoints/ckpt`, {
      key: server.workerToken,
      method: 'PUT',
      body: Buffer.from('x'),
      headers: { 'content-type': 'application/octet-stream', 'x-lease-token': job.lease_token },
    });
    expect(noStep.status).toBe(400);
    const badName = await worker.upload(id, job.lease_token, 'outputs', '..%2Fescape', Buffer.from('x'));
    expect(badName.status).toBe(400);
    const unknown = await worker.heartbeat('job_missing', job.lease_token);
    expect(unknown.status).toBe(404);
    expect((await unknown.json()).error.code).toBe('job_not_found');
    expect((await worker.download('/v1/workers/files/file_missing', job.lease_token)).status).toBe(404);
    expect((await server.api(`/v1/workers/files/${job.inputs[0]!.file_id}`)).status).toBe(401); // a user key
  });

  // RFC 3339 allows these; PGlite read the first back as an invalid date, so every later read of
  // the job's logs failed with a 500 (and it reads years 0–99 back as 19xx or 20xx).
  it('refuses reported timestamps outside years 0100–9999 in UTC or that are no real instant, and keeps the edges', async () => {
    await clearQueue();
    const id = await createFinetune(server);
    const job = (await worker.claim())!;
    const refused = [
      await worker.logs(id, job.lease_token, [{ seq: 1, text: 'x', ts: '0001-01-01T00:00:00+15:59' }]),
      await worker.metrics(id, job.lease_token, [
        { step: 1, phase: 'train', loss: 1, ts: '9999-12-31T23:59:60-00:01' },
      ]),
      await worker.events(id, job.lease_token, {
        events: [{ kind: 'x', ts: '9999-12-31T23:59:59.9999999Z' }],
      }),
    ];
    const params = [];
    for (const res of refused) {
      expect(res.status).toBe(400);
      params.push((await res.json()).error.param);
    }
    expect(params).toEqual(['lines.0.ts', 'points.0.ts', 'events.0.ts']);
    // no real instant: Postgres refused them without naming the field, or read 24:00 as the next day
    for (const ts of ['2026-02-30T00:00:00Z', '2026-04-19T24:00:00Z', '2026-04-19T12:00:00+16:00']) {
      const res = await worker.logs(id, job.lease_token, [{ seq: 1, text: 'x', ts }]);
      expect(res.status).toBe(400);
      expect((await res.json()).error.param).toBe('lines.0.ts');
    }
    const edges = [
      { seq: 1, text: 'first', ts: '0100-01-01T00:00:00Z' },
      { seq: 2, text: 'last', ts: '9999-12-31T23:59:59-00:00' },
    ];
    expect((await worker.logs(id, job.lease_token, edges)).status).toBe(200);
    const page = await (await server.api(`/v1/training/jobs/${id}/logs`)).json();
    expect(page.lines.map((l: { ts: string }) => l.ts)).toEqual([
      '0100-01-01T00:00:00.000Z',
      '9999-12-31T23:59:59.000Z',
    ]);
  });

  // Handed back instead, its attempt given back and runnable at once, such a job (of the highest
  // priority) was claimed first again by every claim, each answered 500: no other job ran.
  it('fails the attempt of a job whose claim answer cannot be built, and hands out the next', async () => {
    await clearQueue();
    const unbuildable = [
      await createFinetune(server, { priority: 90 }),
      await createFinetune(server, { priority: 80 }),
      await createFinetune(server, { priority: 70 }),
    ];
    const next = await createFinetune(server, { priority: 75 });
    const last = await createFinetune(server);
    const box = server.ctx.secretBox;
    const open = box.open.bind(box);
    const fault = vi.spyOn(box, 'open').mockImplementation((jobId, sealed) => {
      if (unbuildable.includes(jobId)) throw new Error('injected fault');
      return open(jobId, sealed);
    });
    const logged = vi.spyOn(server.ctx.logger, 'error');
    const batchClaim = (maxJobs: number) =>
      server.api('/v1/workers/claim', {
        key: server.workerToken,
        method: 'POST',
        json: {
          worker_id: 'worker-1',
          capabilities: { job_types: ['finetune'], device: 'cpu' },
          max_jobs: maxJobs,
          wait_seconds: 0,
        },
      });
    const claimedIds = async (res: Response) => {
      expect(res.status).toBe(200);
      return (await res.json()).jobs.map((j: { job_id: string }) => j.job_id);
    };
    try {
      await expect(worker.claim()).rejects.toThrow(/claim answered 500/);
      // a batch leaves the job out and hands out the others
      expect(await claimedIds(await batchClaim(2))).toEqual([next]);
      // one that leased that job alone claims again (it answered 500, as a claim of one job does)
      expect(await claimedIds(await batchClaim(1))).toEqual([last]);
      // each failure is logged once (a claim of one job logged it twice), with the job's id
      const faults = logged.mock.calls
        .map(([fields]) => fields as { err?: Error & { jobId?: string }; jobId?: string })
        .filter(({ err }) =>
          [err?.message, (err?.cause as Error | undefined)?.message].includes('injected fault'),
        )
        .map((fields) => fields.err?.jobId ?? fields.jobId);
      expect(faults).toEqual(unbuildable);
    } finally {
      fault.mockRestore();
      logged.mockRestore();
    }
    for (const id of unbuildable) {
      expect(await (await server.api(`/v1/training/jobs/${id}`)).json()).toMatchObject({
        status: 'pending',
        attempt: 1,
      });
      const timeline = await (await server.api(`/v1/training/jobs/${id}/events`)).json();
      const retry = timeline.events.find((e: { kind: string }) => e.kind === 'retry');
      expect(retry.payload).toMatchObject({ attempt: 1, retryable: true, error: { code: 'claim_failed' } });
    }
  });

  it('fences every write of a stale lease with 409 lease_lost and changes nothing', async () => {
    await clearQueue();
    const id = await createFinetune(server);
    const job = (await worker.claim())!;
    const stale = 'lease_stale';
    const answers = [
      await worker.heartbeat(id, stale),
      await worker.logs(id, stale, [{ seq: 1, text: 'x' }]),
      await worker.metrics(id, stale, [{ step: 1, phase: 'train', loss: 1 }]),
      await worker.events(id, stale, { phase: 'training', events: [{ kind: 'x' }] }),
      await worker.upload(id, stale, 'outputs', 'x.bin', Buffer.from('x')),
      await worker.upload(id, stale, 'checkpoints', 'checkpoint-1', Buffer.from('x'), 1),
      await worker.complete(id, stale),
      await worker.fail(id, stale),
      await worker.cancelled(id, stale),
    ];
    for (const res of answers) {
      expect(res.status).toBe(409);
      expect((await res.json()).error.code).toBe('lease_lost');
    }
    const row = await server.ctx.knex('jobs').where({ id }).first();
    expect(row).toMatchObject({
      status: 'running',
      phase: 'initializing',
      log_seq: 0,
      last_checkpoint_step: 0,
      lease_token: job.lease_token,
    });
    expect(await server.ctx.knex('files').where({ owner_id: id })).toEqual([]);
    expect(await server.ctx.knex('job_logs').where({ job_id: id })).toEqual([]);
  });

  it("passes a job's config through as the spec of types the server does not reshape", async () => {
    await clearQueue();
    const id = newId('job');
    await enqueueJob(server.ctx, server.ctx.knex, {
      id,
      tenantId: 'default',
      kind: 'training',
      type: 'benchmark',
      config: { max_examples: 5 },
      priority: 99,
    });
    const job = (await worker.claim({ job_types: ['benchmark'], methods: ['lora'], device: 'cpu' }))!;
    expect(job).toMatchObject({ job_id: id, type: 'benchmark', spec: { max_examples: 5 }, inputs: [] });
  });
});
