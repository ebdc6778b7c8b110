import { createHash } from 'node:crypto';
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { completeJobs } from '../src/queue/complete.js';
import type { JobRow } from '../src/queue/types.js';
import { type CompletedJobOptions, completedJob, leaseJob } from './fixtures.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

/** This file's jobs: from llama-3.2-1b, with no method and one whole-model file unless given. */
const modelJob = (server: TestServer, opts: CompletedJobOptions & { type: string }) =>
  completedJob(server, {
    method: null,
    baseModel: 'llama-3.2-1b',
    files: { 'model.safetensors': 'weights' },
    ...opts,
  });

/** A stand-in for Ollama's HTTP API that records what it was sent. */
async function fakeOllama() {
  const blobs = new Map<string, Buffer>();
  const creates: unknown[] = [];
  const read = async (req: IncomingMessage) => {
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks);
  };
  const server: Server = createServer(async (req, res) => {
    const blob = /^\/api\/blobs\/(sha256:[0-9a-f]{64})$/.exec(req.url ?? '');
    if (blob && req.method === 'HEAD') {
      res.writeHead(blobs.has(blob[1]!) ? 200 : 404).end();
    } else if (blob && req.method === 'POST') {
      const body = await read(req);
      const digest = `sha256:${createHash('sha256').update(body).digest('hex')}`;
      if (digest !== blob[1]) {
        res.writeHead(400, { 'content-type': 'application/json' }).end('{"error":"digest mismatch"}');
        return;
      }
      blobs.set(digest, body);
      res.writeHead(201).end();
    } else if (req.url === '/api/create' && req.method === 'POST') {
      const body = JSON.parse((await read(req)).toString()) as { files: Record<string, string> };
      creates.push(body);
      const missing = Object.values(body.files).some((digest) => !blobs.has(digest));
      res
        .writeHead(missing ? 400 : 200, { 'content-type': 'application/json' })
        .end(missing ? '{"error":"blob not found"}' : '{"status":"success"}');
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    blobs,
    creates,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

describe.each(DATABASES)('models on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    // The tenant's own catalog entries below are directories under /models on the workers.
    server = await startTestServer(db, { modelRoots: ['/models'] });
  });
  afterAll(async () => {
    await server?.stop();
  });

  it('registers each job type as its model kind', async () => {
    const cases: [string, string | null, string, boolean][] = [
      ['finetune', 'full', 'full', false],
      ['finetune', 'qlora', 'adapter', true],
      ['merge', null, 'merged', false],
      ['train', null, 'grown', false],
      ['contract', null, 'contracted', false],
    ];
    for (const [type, method, kind, adapter] of cases) {
      const { modelId, adapterName } = await modelJob(server, {
        type,
        method,
        result: { params_before: 100, params_after: 150 },
      });
      const model = await (await server.api(`/v1/models/${modelId}`)).json();
      expect(model).toMatchObject({
        kind,
        base_model: 'llama-3.2-1b',
        params: 150,
        active: false,
        benchmark: null,
      });
      expect(adapterName !== null).toBe(adapter);
    }
    const distilled = await modelJob(server, {
      kind: 'distillation',
      type: 'distill',
      config: { output_name: 'student-v1' },
      files: { 'adapter_model.safetensors': 'a', 'model-q8_0.gguf': 'gguf' },
    });
    expect(distilled.adapterName).toBe('student-v1');
    const model = await (await server.api(`/v1/models/${distilled.modelId}`)).json();
    expect(model).toMatchObject({ kind: 'distilled', name: 'student-v1' });
    expect(model.files.find((f: { name: string }) => f.name === 'model-q8_0.gguf').download_url).toBe(
      `/v1/distillation/${distilled.jobId}/artifacts/model-q8_0.gguf`,
    );
    const benchmark = await modelJob(server, {
      type: 'benchmark',
      result: { scores: { perplexity: 3 } },
    });
    expect(benchmark).toMatchObject({ modelId: null, adapterName: null });
  });

  it('lists newest first and hides other tenants', async () => {
    const { modelId } = await modelJob(server, { type: 'train', config: { output_name: 'newest' } });
    const list = await (await server.api('/v1/models?limit=2')).json();
    expect(list.models[0]).toMatchObject({ id: modelId, name: 'newest' });
    expect(list.models).toHaveLength(2);
    expect(list.has_more).toBe(true);
    expect((await (await server.api('/v1/models', { key: server.otherKey })).json()).total).toBe(0);
    for (const path of [`/v1/models/${modelId}`]) {
      const res = await server.api(path, { key: server.otherKey });
      expect(res.status).toBe(404);
      expect((await res.json()).error).toMatchObject({ code: 'not_found', param: 'model_id' });
    }
    const activate = await server.api(`/v1/models/${modelId}/activate`, {
      method: 'POST',
      key: server.otherKey,
      json: {},
    });
    expect(activate.status).toBe(404);
    const bench = await server.api(`/v1/models/${modelId}/benchmark`, {
      method: 'POST',
      key: server.otherKey,
      json: {},
    });
    expect(bench.status).toBe(404);
  });

  it('activates one model at a time', async () => {
    const a = await modelJob(server, { type: 'train', config: { output_name: 'model-a' } });
    const b = await modelJob(server, { type: 'train', config: { output_name: 'model-b' } });
    const res = await server.api(`/v1/models/${a.modelId}/activate`, {
      method: 'POST',
      json: { provider_model: 'eliza-v1' },
    });
    expect(res.status).toBe(200);
    const body = await res.json();
    expect(body).toMatchObject({
      ok: true,
      active_model: 'eliza-v1',
      model: { id: a.modelId, active: true, provider_model: 'eliza-v1' },
    });

    const second = await (await server.api(`/v1/models/${b.modelId}/activate`, { method: 'POST' })).json();
    expect(second).toMatchObject({ active_model: 'model-b', model: { active: true } });
    expect((await (await server.api(`/v1/models/${a.modelId}`)).json()).active).toBe(false);

    const bad = await server.api(`/v1/models/${a.modelId}/activate`, {
      method: 'POST',
      json: { provider_model: '' },
    });
    expect((await bad.json()).error).toMatchObject({ code: 'invalid_request', param: 'provider_model' });
  });

  it('imports a GGUF into Ollama through its API', async () => {
    const ollama = await fakeOllama();
    try {
      const { modelId } = await modelJob(server, {
        type: 'merge',
        config: { output_name: 'merged-v1' },
        files: { 'model.safetensors': 'w', 'model-q8_0.gguf': 'GGUF-q8', 'model-q4_0.gguf': 'GGUF-q4' },
      });
      const res = await server.api(`/v1/models/${modelId}/import-ollama`, {
        method: 'POST',
        json: { model_name: 'eliza-v1', ollama_url: ollama.url, quantization: 'q4_0' },
      });
      expect(res.status).toBe(200);
      const body = await res.json();
      expect(body.model).toMatchObject({ id: modelId, ollama_name: 'tunery-default/eliza-v1' });
      const digest = `sha256:${createHash('sha256').update('GGUF-q4').digest('hex')}`;
      expect(ollama.blobs.get(digest)?.toString()).toBe('GGUF-q4');
      expect(ollama.creates).toEqual([
        { model: 'tunery-default/eliza-v1', files: { 'model-q4_0.gguf': digest }, stream: false },
      ]);
      const model = await (await server.api(`/v1/models/${modelId}`)).json();
      expect(model).toMatchObject({
        ollama_name: 'tunery-default/eliza-v1',
        imported_at: body.model.imported_at,
      });

      // Default name and file: the model's name, q8_0 before any other type; the blob is not re-sent.
      const again = await (
        await server.api(`/v1/models/${modelId}/import-ollama`, {
          method: 'POST',
          json: { ollama_url: ollama.url },
        })
      ).json();
      expect(again.model.ollama_name).toBe('tunery-default/merged-v1');
      expect(ollama.blobs.size).toBe(2);
    } finally {
      await ollama.close();
    }
  });

  it('refuses non-loopback Ollama URLs, models without GGUF, and unreachable Ollama', async () => {
    const { modelId } = await modelJob(server, { type: 'merge', files: { 'model.safetensors': 'w' } });
    for (const url of [
      'http://example.com:11434',
      'http://10.0.0.1:11434',
      'ftp://127.0.0.1/',
      'http://user:pw@localhost:1',
    ]) {
      const res = await server.api(`/v1/models/${modelId}/import-ollama`, {
        method: 'POST',
        json: { ollama_url: url },
      });
      expect(res.status).toBe(400);
      expect((await res.json()).error).toMatchObject({ code: 'invalid_request', param: 'ollama_url' });
    }
    const noGguf = await server.api(`/v1/models/${modelId}/import-ollama`, {
      method: 'POST',
      json: { ollama_url: 'http://[::1]:1' },
    });
    expect(noGguf.status).toBe(409);
    expect((await noGguf.json()).error.code).toBe('conflict');

    const withGguf = await modelJob(server, { type: 'merge', files: { 'model-f16.gguf': 'g' } });
    const ollama = await fakeOllama();
    const deadUrl = ollama.url;
    await ollama.close();
    const dead = await server.api(`/v1/models/${withGguf.modelId}/import-ollama`, {
      method: 'POST',
      json: { ollama_url: deadUrl },
    });
    expect(dead.status).toBe(502);
    expect((await dead.json()).error).toMatchObject({ code: 'ollama_unreachable', param: 'ollama_url' });
    const badQuant = await server.api(`/v1/models/${withGguf.modelId}/import-ollama`, {
      method: 'POST',
      json: { quantization: 'q9_9' },
    });
    expect((await badQuant.json()).error).toMatchObject({ code: 'invalid_request', param: 'quantization' });
  });

  it('queues a benchmark job whose scores land on the model', async () => {
    const { modelId, jobId: trainJobId } = await modelJob(server, {
      type: 'train',
      config: { output_name: 'bench-me' },
    });
    const ds = await (
      await server.api('/v1/datasets', { method: 'POST', json: { train_texts: ['eval text'] } })
    ).json();
    const body = { dataset_id: ds.id, max_examples: 50, idempotency_key: 'bench-1' };
    const res = await server.api(`/v1/models/${modelId}/benchmark`, { method: 'POST', json: body });
    expect(res.status).toBe(202);
    const queued = await res.json();
    expect(queued).toMatchObject({ model_id: modelId, status: 'pending', scores: null, completed_at: null });
    const job = (await server.ctx.knex('jobs').where({ id: queued.job_id }).first()) as JobRow;
    expect(job).toMatchObject({
      type: 'benchmark',
      model_id: modelId,
      dataset_id: ds.id,
      parent_job_id: trainJobId,
    });
    expect(job.config).toMatchObject({ model_id: modelId, dataset_id: ds.id, max_examples: 50 });

    const repeat = await (
      await server.api(`/v1/models/${modelId}/benchmark`, { method: 'POST', json: body })
    ).json();
    expect(repeat.job_id).toBe(queued.job_id);
    const conflict = await server.api(`/v1/models/${modelId}/benchmark`, {
      method: 'POST',
      json: { ...body, max_examples: 5 },
    });
    expect((await conflict.json()).error.code).toBe('idempotency_conflict');

    const scores = { perplexity: 4.2, coherence: 0.87, consistency: 0.91, helpfulness: 0.84 };
    const leaseToken = await leaseJob(server, job.id);
    expect(await completeJobs(server.ctx, [{ jobId: job.id, leaseToken, result: { scores } }])).toEqual([
      { jobId: job.id },
    ]);
    const model = await (await server.api(`/v1/models/${modelId}`)).json();
    expect(model.benchmark).toMatchObject({ scores, job_id: job.id, dataset_id: ds.id });
    const finished = await (
      await server.api(`/v1/models/${modelId}/benchmark`, { method: 'POST', json: body })
    ).json();
    expect(finished).toMatchObject({ status: 'completed', scores });
    expect(finished.completed_at).not.toBeNull();

    // Without dataset_id the model is scored on what it was trained on; without that either, 400.
    const noData = await server.api(`/v1/models/${modelId}/benchmark`, { method: 'POST', json: {} });
    expect(noData.status).toBe(400);
    expect((await noData.json()).error).toMatchObject({ code: 'invalid_config', param: 'dataset_id' });
    await server.ctx.knex('jobs').where({ id: trainJobId }).update({ dataset_id: ds.id });
    const fallback = await server.api(`/v1/models/${modelId}/benchmark`, { method: 'POST', json: {} });
    expect(fallback.status).toBe(202);
    const fallbackJob = await server.ctx
      .knex('jobs')
      .where({ id: (await fallback.json()).job_id })
      .first();
    expect(fallbackJob.dataset_id).toBe(ds.id);
    expect(fallbackJob.config).toMatchObject({
      dataset_format: 'text',
      base_model: { name: 'bench-me', source: null },
    });

    const missingDataset = await server.api(`/v1/models/${modelId}/benchmark`, {
      method: 'POST',
      json: { dataset_id: 'ds_nope' },
    });
    expect(missingDataset.status).toBe(404);
    const badRange = await server.api(`/v1/models/${modelId}/benchmark`, {
      method: 'POST',
      json: { max_examples: 0 },
    });
    expect((await badRange.json()).error).toMatchObject({ code: 'invalid_request', param: 'max_examples' });
  });

  it('shows only the finite benchmark scores (a NaN the worker sent arrives as null)', async () => {
    const { modelId } = await modelJob(server, { type: 'train', config: { output_name: 'nan-scores' } });
    const ds = await (
      await server.api('/v1/datasets', { method: 'POST', json: { train_texts: ['eval text'] } })
    ).json();
    const body = { dataset_id: ds.id, idempotency_key: 'bench-nan' };
    const queued = await (
      await server.api(`/v1/models/${modelId}/benchmark`, { method: 'POST', json: body })
    ).json();
    await server.ctx
      .knex('jobs')
      .where({ id: queued.job_id })
      .update({
        status: 'completed',
        results: JSON.stringify({ scores: { perplexity: null, coherence: 0.5 } }),
        finished_at: server.ctx.knex.fn.now(),
      });
    const result = await server.api(`/v1/training/jobs/${queued.job_id}/result`);
    expect(result.status).toBe(200);
    expect((await result.json()).scores).toEqual({ coherence: 0.5 });
    const repeat = await server.api(`/v1/models/${modelId}/benchmark`, { method: 'POST', json: body });
    expect(repeat.status).toBe(202);
    const answer = await repeat.json();
    expect(answer.status).toBe('completed');
    expect(answer.scores).toEqual({ coherence: 0.5 });
  });

  describe('base-model catalog', () => {
    it('lists the shipped entries with parameter counts, first', async () => {
      const list = await (await server.api('/v1/base-models?limit=100')).json();
      expect(list.total).toBeGreaterThanOrEqual(10);
      const qwen = list.models.find((m: { name: string }) => m.name === 'qwen2.5-7b-instruct');
      expect(qwen).toMatchObject({
        source: 'Qwen/Qwen2.5-7B-Instruct',
        params: 7_615_616_512,
        architecture: 'qwen2',
        builtin: true,
      });
      expect(list.models[0]).toMatchObject({ name: 'smollm2-135m-instruct', builtin: true });
    });

    it('registers the tenant’s own entries', async () => {
      const body = {
        name: 'tiny-llama',
        source: '/models/tiny-llama',
        params: 1_000_000,
        architecture: 'llama',
        context_length: 256,
      };
      const res = await server.api('/v1/base-models', {
        method: 'POST',
        json: { ...body, idempotency_key: 'bm-1' },
      });
      expect(res.status).toBe(201);
      const created = await res.json();
      expect(created).toMatchObject({ ...body, builtin: false });
      expect(created.id).toMatch(/^bm_/);
      const repeat = await (
        await server.api('/v1/base-models', { method: 'POST', json: { ...body, idempotency_key: 'bm-1' } })
      ).json();
      expect(repeat.id).toBe(created.id);

      const list = await (await server.api('/v1/base-models?limit=100')).json();
      expect(list.models.at(-1)).toMatchObject({ name: 'tiny-llama', builtin: false });
      const others = await (await server.api('/v1/base-models?limit=100', { key: server.otherKey })).json();
      expect(others.models.some((m: { name: string }) => m.name === 'tiny-llama')).toBe(false);

      const duplicate = await server.api('/v1/base-models', { method: 'POST', json: body });
      expect(duplicate.status).toBe(409);
      expect((await duplicate.json()).error).toMatchObject({ code: 'conflict', param: 'name' });
      const shadow = await server.api('/v1/base-models', {
        method: 'POST',
        json: { name: 'llama-3.1-8b', source: 'a/b' },
      });
      expect(shadow.status).toBe(409);
      // Another tenant may use the same name for its own entry.
      const theirs = await server.api('/v1/base-models', {
        method: 'POST',
        json: body,
        key: server.otherKey,
      });
      expect(theirs.status).toBe(201);
    });

    it('refuses bad entries', async () => {
      const badSource = await server.api('/v1/base-models', {
        method: 'POST',
        json: { name: 'x', source: '../up' },
      });
      expect((await badSource.json()).error).toMatchObject({ code: 'invalid_config', param: 'source' });
      const missing = await server.api('/v1/base-models', { method: 'POST', json: { name: 'x' } });
      expect((await missing.json()).error).toMatchObject({ code: 'invalid_request', param: 'source' });
      const badName = await server.api('/v1/base-models', {
        method: 'POST',
        json: { name: 'a/b', source: 'a/b' },
      });
      expect((await badName.json()).error).toMatchObject({ code: 'invalid_request', param: 'name' });
      const badParams = await server.api('/v1/base-models', {
        method: 'POST',
        json: { name: 'y', source: 'a/b', params: 0 },
      });
      expect((await badParams.json()).error).toMatchObject({ code: 'invalid_request', param: 'params' });
    });
  });
});
