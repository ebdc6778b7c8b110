// Every response the mocks send must be valid against openapi/openapi.yaml for its operation and
// status: the same document the server validates its responses against. The scenario below drives
// every operation at least once, and the last test fails if one was missed.
import { Ajv2020 } from 'ajv/dist/2020.js';
import formats from 'ajv-formats';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Tunery } from '../../src/index.js';
import { BASE_URL, useMockServer } from '../helpers.js';
import { dereference, findOperation, loadSpec, operationsOf } from '../spec.js';

type Json = Record<string, unknown>;

const spec = dereference(loadSpec());
const operations = operationsOf(spec);
const ajv = new Ajv2020({ strict: false, allErrors: true });
// ajv-formats is CommonJS: under Node's ESM interop its plugin is the `default` of the default export.
const addFormats = (formats as unknown as { default: typeof formats.default }).default;
addFormats(ajv);

const { mock, server, client } = useMockServer();

interface Checked {
  operationId: string;
  status: number;
  problem?: string;
}
const checked: Checked[] = [];
const pending: Promise<void>[] = [];

async function check(request: { method: string; url: string }, response: Response): Promise<void> {
  const op = findOperation(operations, request.method, request.url);
  if (!op) {
    checked.push({
      operationId: `${request.method} ${request.url}`,
      status: response.status,
      problem: 'no such operation',
    });
    return;
  }
  const declared = (op.operation.responses as Json)[String(response.status)] as Json | undefined;
  const record = (problem?: string) => {
    checked.push({ operationId: op.operationId, status: response.status, problem });
  };
  if (!declared) return record(`status ${response.status} is not declared`);
  const content = declared.content as Record<string, { schema: Json }> | undefined;
  const text = await response.text();
  if (!content) return record(text ? 'a body where the spec declares none' : undefined);
  const type = response.headers.get('content-type')?.split(';')[0] ?? '';
  const media = content[type];
  if (!media) return record(`content type ${type} is not declared (${Object.keys(content).join(', ')})`);
  if (type !== 'application/json') return record();
  const validate = ajv.compile(media.schema);
  if (!validate(JSON.parse(text))) return record(ajv.errorsText(validate.errors, { dataVar: 'body' }));
  record();
}

beforeAll(() => {
  server.events.on('response:mocked', ({ request, response }) => {
    pending.push(check({ method: request.method, url: request.url }, response.clone()));
  });
});
afterAll(() => server.events.removeAllListeners());

// The worker protocol is not part of the SDK; a bare fetch drives it.
async function worker(method: string, path: string, body?: unknown, headers: Record<string, string> = {}) {
  const isBytes = body instanceof Uint8Array;
  const response = await fetch(`${BASE_URL}${path}`, {
    method,
    headers: {
      Authorization: 'Bearer tw_worker',
      ...(body && !isBytes ? { 'Content-Type': 'application/json' } : {}),
      ...headers,
    },
    body: body === undefined ? undefined : isBytes ? (body as BodyInit) : JSON.stringify(body),
  });
  return {
    status: response.status,
    body: response.status === 204 ? undefined : await response.json().catch(() => undefined),
  };
}

const expectError = async (promise: Promise<unknown>, status: number) =>
  expect(promise).rejects.toMatchObject({ status });

describe('every mock response is valid against the spec', () => {
  let tunery: Tunery;

  it('meta, budget, catalog, templates', async () => {
    tunery = client({ maxRetries: 0 });
    await tunery.health();
    await tunery.version();
    await tunery.budget.get();
    await tunery.budget.update({ limit_usd: 100 });
    mock.failNext('updateBudget', 403);
    await expectError(tunery.budget.update({ limit_usd: 1 }), 403);
    mock.failNext('getBudget', 401);
    await expectError(tunery.budget.get(), 401);
    const { key } = await tunery.admin.keys.create({ tenant_id: 'acme', expires_at: '2999-01-01T00:00:00Z' });
    await tunery.admin.keys.create({ kind: 'worker', name: 'gpu' });
    await tunery.admin.keys.list({ include_inactive: true });
    await tunery.admin.keys.revoke(key.id);
    await expectError(tunery.admin.keys.revoke('key_missing'), 404);
    mock.failNext('listApiKeys', 403);
    await expectError(tunery.admin.keys.list(), 403);
    await expectError(tunery.admin.keys.create({ expires_at: '2000-01-01T00:00:00Z' }), 400);
    const hook = await tunery.webhooks.create({ url: 'https://ci.example.com/hook', events: ['job.failed'] });
    await tunery.webhooks.list();
    await tunery.webhooks.retrieve(hook.webhook.id);
    await tunery.webhooks.deliveries(hook.webhook.id);
    await expectError(tunery.webhooks.create({ url: 'not a url' }), 400);
    await tunery.webhooks.delete(hook.webhook.id);
    await expectError(tunery.webhooks.retrieve(hook.webhook.id), 404);
    await tunery.baseModels.list();
    await tunery.baseModels.create({ name: 'qwen', source: 'Qwen/Qwen2.5-0.5B' });
    await expectError(tunery.baseModels.create({ name: 'qwen', source: 'again' }), 409);
    await tunery.training.templates.list({ limit: 1 });
    await tunery.training.templates.create({
      name: 'mine',
      description: 'd',
      config: { lora_config: { r: 4 } },
    });
    await tunery.training.templates.retrieve('mine');
    await tunery.training.templates.delete('mine');
    await expectError(tunery.training.templates.delete('lora-default'), 409);
    await expectError(tunery.training.templates.retrieve('mine'), 404);
    await expectError(tunery.training.templates.list({ limit: 1000 }), 400);
  });

  it('datasets and trajectories', async () => {
    await tunery.datasets.create({ train_texts: ['a', 'b'] });
    await tunery.datasets.upload({ file: new Blob(['{"text": "x"}\n']), name: 'up' });
    await expectError(tunery.datasets.create({ jsonl: 'nope' }), 400);
    const listed = await tunery.datasets.list();
    await tunery.datasets.retrieve(listed.data[0]!.id);
    await tunery.datasets.delete(listed.data[0]!.id);
    await expectError(tunery.datasets.retrieve('ds_missing'), 404);
    const trajectory = await tunery.trajectories.create({
      llm_calls: [{ user_prompt: 'q', response: 'a', messages: [{ role: 'user', content: 'q' }] }],
      start_time: '2026-04-19T12:00:00Z',
    });
    await tunery.trajectories.list();
    await tunery.trajectories.retrieve(trajectory.id);
    await tunery.datasets.build({ name: 'built' });
    await expectError(tunery.datasets.build({ source: 'nowhere' }), 400);
  });

  it('planning and auto-training', async () => {
    await tunery.training.estimate({ base_model: 'tiny-llama', dataset_tokens: 1000 });
    await tunery.training.recommend({ base_model: 'tiny-llama' });
    await tunery.training.autoConfig.get();
    await tunery.training.autoConfig.update({ threshold: 5 });
    await tunery.training.status();
  });

  it('a training job end to end, with downloads, merge, models and adapters', async () => {
    const jobs = tunery.training.jobs;
    const job = await jobs.create({ base_model: 'tiny-llama', train_texts: ['hi'], output_name: 'hi' });
    await jobs.list({ status: 'pending', type: 'finetune' });
    await jobs.retrieve(job.id);
    mock.advanceJob(job.id, { step: 30 });
    await jobs.logs(job.id, { since: 1 });
    await jobs.metrics(job.id, { since_step: 10, limit: 5 });
    await jobs.events(job.id);
    await jobs.checkpoints(job.id);
    await expectError(jobs.result(job.id), 404);
    await expectError(jobs.merge(job.id), 409);
    mock.advanceJob(job.id, 'completed');
    for await (const message of jobs.stream(job.id)) if (message.type === 'end') break;
    await jobs.result(job.id);
    await jobs.outputs(job.id);
    await new Response(await jobs.download(job.id, 'adapter_config.json')).arrayBuffer();
    await new Response(
      await jobs.download(job.id, 'adapter_config.json', { range: 'bytes=0-9' }),
    ).arrayBuffer();
    await expectError(jobs.download(job.id, 'adapter_config.json', { range: 'bytes=99999-' }), 416);
    await expectError(jobs.download(job.id, 'missing.bin'), 404);
    const { merge_job_id } = await jobs.merge(job.id, { export_gguf: true, quantization_types: ['q8_0'] });
    mock.advanceJob(merge_job_id, 'completed');
    const merged = (await jobs.retrieve(merge_job_id)).output_model_id!;
    await tunery.training.stats();

    await tunery.models.list();
    await tunery.models.retrieve(merged);
    await tunery.models.activate(merged);
    await tunery.models.importOllama(merged);
    const adapterModel = (await jobs.retrieve(job.id)).output_model_id!;
    await expectError(tunery.models.importOllama(adapterModel), 409);
    await expectError(tunery.models.importOllama(merged, { ollama_url: 'http://example.com' }), 400);
    mock.state.ollamaReachable = false;
    await expectError(tunery.models.importOllama(merged), 502);
    await tunery.models.benchmark(merged);
    await expectError(tunery.models.retrieve('mdl_missing'), 404);

    await tunery.adapters.list();
    await tunery.adapters.retrieve('hi');
    await tunery.adapters.load('hi');
    await tunery.adapters.unload();
    await expectError(tunery.adapters.unload(), 400);
    await tunery.adapters.delete('hi');
    await expectError(tunery.adapters.load('hi'), 404);
  });

  it('cancel, resume, delete and budget refusals', async () => {
    const jobs = tunery.training.jobs;
    const a = await jobs.create({ base_model: 'tiny-llama', train_texts: ['x'] });
    await jobs.cancel(a.id);
    await expectError(jobs.cancel(a.id), 409);
    await expectError(jobs.resume(a.id), 409);
    const b = await jobs.create({ base_model: 'tiny-llama', train_texts: ['x'] });
    mock.advanceJob(b.id, { step: 25 });
    mock.advanceJob(b.id, 'failed');
    await jobs.resume(b.id, { checkpoint: 'checkpoint-20' });
    const c = await jobs.create({ base_model: 'tiny-llama', train_texts: ['x'] });
    const deleted = await fetch(`${BASE_URL}/v1/training/jobs/${c.id}`, { method: 'DELETE' });
    expect(deleted.status).toBe(200);
    await fetch(`${BASE_URL}/v1/training/jobs/${c.id}`, { method: 'DELETE' });
    await expectError(jobs.create({ base_model_id: 'bm_missing', train_texts: ['x'] }), 404);
    await tunery.budget.update({ limit_usd: 0 });
    await expectError(jobs.create({ base_model: 'tiny-llama', train_texts: ['x'] }), 402);
    await expectError(
      tunery.distillation.create({
        config: { teacher_model: 'local/t', student_model: 's', prompts: ['p'] },
      }),
      402,
    );
    await tunery.budget.update({ limit_usd: null });
    mock.failNext('createTrainingJob', 413);
    await expectError(jobs.create({ base_model: 'tiny-llama', train_texts: ['x'] }), 413);
  });

  it('distillation', async () => {
    const distiller = tunery.distillation;
    const config = {
      teacher_model: 'openai/gpt-4o',
      student_model: 'tiny-llama',
      prompts: ['p1', 'p2'],
      export_gguf: true,
    };
    const job = await distiller.create({ name: 'd', config });
    await distiller.list({ status: 'pending' });
    await distiller.retrieve(job.id);
    await distiller.artifacts(job.id);
    await distiller.events(job.id, { since: 0 });
    await distiller.logs(job.id, { tail: 10 });
    await distiller.metrics(job.id, { since_step: -1 });
    await distiller.checkpoints(job.id);
    await distiller.stream(job.id).next();
    await expectError(distiller.resume(job.id), 409); // not failed or cancelled
    await expectError(distiller.events('job_missing'), 404);
    mock.advanceJob(job.id, 'done');
    const artifacts = await distiller.artifacts(job.id);
    await new Response(await distiller.downloadArtifact(job.id, artifacts.files[0]!.name)).arrayBuffer();
    await new Response(
      await distiller.downloadArtifact(job.id, artifacts.files[0]!.name, { range: 'bytes=5-' }),
    ).arrayBuffer();
    await expectError(
      distiller.downloadArtifact(job.id, artifacts.files[0]!.name, { range: 'bytes=x' }),
      416,
    );
    await expectError(distiller.cancel(job.id), 409);
    const other = await distiller.create({ config });
    await distiller.cancel(other.id);
    await expectError(distiller.retrieve('job_missing'), 404);
    await expectError(distiller.list({ tenant_id: 'other' }), 403);
    await expectError(distiller.create({ config: { teacher_model: 't', student_model: 's' } }), 400);
  });

  it('the worker protocol', async () => {
    const capabilities = { job_types: ['finetune', 'distill'], device: 'cpu' };
    const job = await tunery.training.jobs.create({
      base_model: 'tiny-llama',
      train_texts: ['w'],
      priority: 90,
    });
    expect((await worker('POST', '/v1/workers/inference/claim', { worker_id: 'w1' })).status).toBe(204);
    const report = { request_token: 'infreq_x', worker_id: 'w1', text: 'hi' };
    expect((await worker('POST', '/v1/workers/inference/inf_missing/report', report)).body).toEqual({
      cancelled: true,
    });
    const claim = await worker('POST', '/v1/workers/claim', { worker_id: 'w1', capabilities });
    expect(claim.status).toBe(200);
    const { lease_token, job_id, inputs } = (claim.body as { job: Json }).job as {
      lease_token: string;
      job_id: string;
      inputs: { download_url: string }[];
    };
    expect(job_id).toBe(job.id);
    const lease = { lease_token };
    await worker('POST', `/v1/workers/jobs/${job_id}/heartbeat`, {
      ...lease,
      progress: { current_step: 1, total_steps: 60 },
    });
    await worker('POST', `/v1/workers/jobs/${job_id}/logs`, {
      ...lease,
      lines: [{ seq: 10, text: 'hello' }],
    });
    await worker('POST', `/v1/workers/jobs/${job_id}/metrics`, {
      ...lease,
      points: [{ step: 1, phase: 'train', loss: 2 }],
    });
    await worker('POST', `/v1/workers/jobs/${job_id}/events`, {
      ...lease,
      phase: 'training',
      events: [{ kind: 'note' }],
    });
    await worker(
      'PUT',
      `/v1/workers/jobs/${job_id}/checkpoints/checkpoint-1?step=1`,
      new Uint8Array([1, 2, 3]),
      {
        'X-Lease-Token': lease_token,
        'Content-Type': 'application/octet-stream',
      },
    );
    await worker(
      'PUT',
      `/v1/workers/jobs/${job_id}/outputs/adapter_model.safetensors`,
      new Uint8Array([4, 5]),
      {
        'X-Lease-Token': lease_token,
        'Content-Type': 'application/octet-stream',
      },
    );
    // a resumable upload: one chunk (202), where to go on, the rest (201)
    const ranged = (range: string, bytes: number[]) =>
      worker('PUT', `/v1/workers/jobs/${job_id}/outputs/model.safetensors`, new Uint8Array(bytes), {
        'X-Lease-Token': lease_token,
        'Content-Type': 'application/octet-stream',
        'Content-Range': range,
      });
    expect((await ranged('bytes 0-1/4', [1, 2])).status).toBe(202);
    const offset = await worker(
      'GET',
      `/v1/workers/jobs/${job_id}/outputs/model.safetensors/offset`,
      undefined,
      {
        'X-Lease-Token': lease_token,
      },
    );
    expect(offset.body).toEqual({ received_bytes: 2 });
    expect((await ranged('bytes 1-3/4', [2, 3, 4])).status).toBe(409);
    expect((await ranged('bytes 2-3/4', [3, 4])).status).toBe(201);
    const checkpointOffset = await worker(
      'GET',
      `/v1/workers/jobs/${job_id}/checkpoints/checkpoint-1/offset`,
      undefined,
      { 'X-Lease-Token': lease_token },
    );
    expect(checkpointOffset.body).toEqual({ received_bytes: 0 });
    const download = await fetch(`${BASE_URL}${inputs[0]!.download_url}`, {
      headers: { Range: 'bytes=0-3', 'X-Lease-Token': lease_token },
    });
    expect(download.status).toBe(206);
    await download.arrayBuffer();
    const whole = await fetch(`${BASE_URL}${inputs[0]!.download_url}`, {
      headers: { 'X-Lease-Token': lease_token },
    });
    await whole.arrayBuffer();
    const leaseHeader = { 'X-Lease-Token': lease_token };
    expect((await worker('GET', '/v1/workers/files/file_missing', undefined, leaseHeader)).status).toBe(404);
    expect(
      (await worker('GET', inputs[0]!.download_url, undefined, { 'X-Lease-Token': 'stale' })).status,
    ).toBe(404);
    expect(
      (await worker('GET', inputs[0]!.download_url, undefined, { ...leaseHeader, Range: 'bytes=1000000-' }))
        .status,
    ).toBe(416);
    expect(
      (await worker('POST', `/v1/workers/jobs/${job_id}/heartbeat`, { lease_token: 'stale' })).status,
    ).toBe(409);
    // The mock forms no gangs: a member token is never valid, an unknown job is not found.
    for (const op of ['wait', 'heartbeat']) {
      const gang = await worker('POST', `/v1/workers/jobs/${job_id}/gang/${op}`, { member_token: 'm' });
      expect(gang).toMatchObject({ status: 409, body: { error: { code: 'lease_lost' } } });
      expect(
        (await worker('POST', `/v1/workers/jobs/job_missing/gang/${op}`, { member_token: 'm' })).status,
      ).toBe(404);
    }
    await worker('POST', `/v1/workers/jobs/${job_id}/complete`, {
      ...lease,
      result: { loss_final: 0.5, note: 'ok' },
    });
    expect((await tunery.training.jobs.result(job_id)).details).toEqual({ note: 'ok' });
    // A batched completion with a lease that moved on fails that item alone.
    const batch = await worker('POST', '/v1/workers/jobs/complete', {
      completions: [{ job_id, lease_token: 'lease_stale', result: {} }],
    });
    expect(batch.body).toMatchObject({ results: [{ job_id, error: { code: 'lease_lost' } }] });

    // A retryable failure goes back to the queue; a final one fails the job.
    await tunery.training.jobs.create({ base_model: 'tiny-llama', train_texts: ['w'] });
    const second = (await worker('POST', '/v1/workers/claim', { worker_id: 'w1', capabilities })).body as {
      job: Json;
    };
    const secondLease = { lease_token: second.job.lease_token };
    await worker('POST', `/v1/workers/jobs/${second.job.job_id}/fail`, {
      ...secondLease,
      error: { code: 'out_of_memory', message: 'OOM' },
    });
    // A worker shutting down hands its job back: pending again at once.
    const handedBack = (await worker('POST', '/v1/workers/claim', { worker_id: 'w1', capabilities }))
      .body as {
      job: Json;
    };
    const released = await worker('POST', `/v1/workers/jobs/${handedBack.job.job_id}/release`, {
      lease_token: handedBack.job.lease_token,
    });
    expect(released.body).toMatchObject({ status: 'pending', will_retry: true });
    const again = (await worker('POST', '/v1/workers/claim', { worker_id: 'w2', capabilities })).body as {
      job: Json;
    };
    await worker('POST', `/v1/workers/jobs/${again.job.job_id}/fail`, {
      lease_token: again.job.lease_token,
      error: { code: 'invalid_config', message: 'bad' },
      retryable: false,
    });

    // A cancel reaches the worker through its heartbeat; it acknowledges.
    const distill = await tunery.distillation.create({
      config: { teacher_model: 'local/t', student_model: 'tiny-llama', prompts: ['p'] },
    });
    const third = (await worker('POST', '/v1/workers/claim', { worker_id: 'w3', capabilities })).body as {
      job: Json;
    };
    expect(third.job.job_id).toBe(distill.id);
    await tunery.distillation.cancel(distill.id);
    const beat = await worker('POST', `/v1/workers/jobs/${distill.id}/heartbeat`, {
      lease_token: third.job.lease_token,
    });
    expect(beat.body).toMatchObject({ cancel_requested: true });
    await worker('POST', `/v1/workers/jobs/${distill.id}/cancelled`, { lease_token: third.job.lease_token });
    expect((await worker('POST', '/v1/workers/claim', { worker_id: 'w1', capabilities })).status).toBe(204);
    mock.failNext('claimJob', 401);
    expect((await worker('POST', '/v1/workers/claim', { worker_id: 'w1', capabilities })).status).toBe(401);
  });

  it('covered every operation, every response valid', async () => {
    await Promise.all(pending);
    const problems = checked
      .filter((c) => c.problem)
      .map((c) => `${c.operationId} ${c.status}: ${c.problem}`);
    expect(problems).toEqual([]);
    const seen = new Set(checked.map((c) => c.operationId));
    const missed = operations.map((op) => op.operationId).filter((id) => !seen.has(id));
    expect(missed).toEqual([]);
    expect(checked.length).toBeGreaterThan(operations.length);
  });
});
