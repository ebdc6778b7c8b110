import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { newId } from '../src/ids.js';
import { completeJobs } from '../src/queue/complete.js';
import { enqueueJob } from '../src/queue/enqueue.js';
import { fakeServingWorker } from './fake-worker.js';
import { completedJob } from './fixtures.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

describe.each(DATABASES)('adapters on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(async () => {
    await server?.stop();
  });

  it('registers a LoRA job as an adapter with seed 003 fields', async () => {
    const { jobId, adapterName, modelId } = await completedJob(server, {
      config: {
        output_name: 'coding_assistant_v1',
        lora_config: { r: 4, lora_alpha: 8 },
        training_config: { learning_rate: 2e-4 },
      },
      files: { 'adapter_model.safetensors': 'w'.repeat(12_500_000), 'adapter_config.json': '{}' },
      result: { loss_final: 0.845, steps: 1000, train_seconds: 930 },
    });
    expect(adapterName).toBe('coding_assistant_v1');
    expect(modelId).toMatch(/^model_/);

    const list = await (await server.api('/v1/adapters')).json();
    expect(list).toMatchObject({ total: 1, has_more: false, current_adapter: null });
    const adapter = list.adapters[0];
    expect(adapter).toMatchObject({
      name: 'coding_assistant_v1',
      model_name: 'codellama-7b-instruct',
      job_id: jobId,
      size_mb: 12.5,
      is_loaded: false,
      training_config: { method: 'lora', r: 4, lora_alpha: 8, learning_rate: 2e-4 },
      metrics: { final_loss: 0.845, training_steps: 1000, training_time_minutes: 15.5 },
    });
    expect(adapter.path).toBe(`files/jobs/${jobId}/outputs`);

    const got = await (await server.api('/v1/adapters/coding_assistant_v1')).json();
    expect(got.files.map((f: { name: string }) => f.name)).toEqual([
      'adapter_config.json',
      'adapter_model.safetensors',
    ]);
    expect(got.files[1]).toMatchObject({
      size_bytes: 12_500_000,
      size_mb: 12.5,
      download_url: `/v1/training/jobs/${jobId}/output/adapter_model.safetensors`,
    });

    const model = await (await server.api(`/v1/models/${modelId}`)).json();
    expect(model).toMatchObject({ kind: 'adapter', name: 'coding_assistant_v1', job_id: jobId });
  });

  it('names adapters uniquely and registers a job only once', async () => {
    const first = await completedJob(server, {
      config: {
        hyperparams: { output_name: 'twin' },
        lora: { r: 8, alpha: 16, dropout: 0.05 },
        training: { max_steps: 30 },
      },
    });
    const twin = await (await server.api('/v1/adapters/twin')).json();
    expect(twin.training_config).toEqual({
      method: 'lora',
      r: 8,
      lora_alpha: 16,
      lora_dropout: 0.05,
      max_steps: 30,
    });
    const second = await completedJob(server, { config: { output_name: 'twin' } });
    expect(first.adapterName).toBe('twin');
    expect(second.adapterName).toBe(`twin-${second.jobId.slice(-8)}`);
    const unnamed = await completedJob(server, { baseModel: 'Qwen/Qwen2.5-0.5B-Instruct' });
    expect(unnamed.adapterName).toBe(`qwen2.5-0.5b-instruct-${unnamed.jobId.slice(-8)}`);

    // The same completion sent again (a worker's retry) registers nothing more.
    const again = await completeJobs(server.ctx, [
      { jobId: first.jobId, leaseToken: first.leaseToken, result: {} },
    ]);
    expect(again).toEqual([{ jobId: first.jobId }]);
    expect(await server.ctx.knex('models').where({ job_id: first.jobId })).toHaveLength(1);
    expect(await server.ctx.knex('adapters').where({ job_id: first.jobId })).toHaveLength(1);
  });

  it('gives two jobs completing at once with one output_name distinct adapter names', async () => {
    const both = await Promise.all([
      completedJob(server, { config: { output_name: 'racer' } }),
      completedJob(server, { config: { output_name: 'racer' } }),
    ]);
    const names = both.map((job) => job.adapterName).sort();
    expect(names).toHaveLength(2);
    expect(new Set(names).size).toBe(2);
    expect(names).toContain('racer');
  });

  it('refuses to load an adapter while no worker serves', async () => {
    await completedJob(server, { config: { output_name: 'unserved' } });
    const load = await server.api('/v1/adapters/unserved/load', { method: 'POST' });
    expect(load.status).toBe(503);
    expect((await load.json()).error.code).toBe('no_serving_worker');
    const view = await (await server.api('/v1/adapters/unserved')).json();
    expect(view).toMatchObject({ is_loaded: false, loaded_on: [] });
  });

  it('loads one adapter at a time on a serving worker, and unloads it there', async () => {
    await completedJob(server, { config: { output_name: 'alpha' } });
    await completedJob(server, { config: { output_name: 'beta' } });
    const worker = fakeServingWorker(server);
    await worker.ready();
    try {
      const load = await server.api('/v1/adapters/alpha/load', { method: 'POST' });
      expect(load.status).toBe(200);
      expect(await load.json()).toEqual({
        adapter_name: 'alpha',
        status: 'loaded',
        message: 'Adapter alpha loaded on serving worker serving-1',
      });
      expect(await (await server.api('/v1/adapters/alpha')).json()).toMatchObject({
        is_loaded: true,
        loaded_on: ['serving-1'],
      });
      await server.api('/v1/adapters/beta/load', { method: 'POST' });
      const list = await (await server.api('/v1/adapters?limit=100')).json();
      expect(list.current_adapter).toBe('beta');
      const loaded = list.adapters.filter((a: { loaded_on: string[] }) => a.loaded_on.length > 0);
      expect(loaded.map((a: { name: string; is_loaded: boolean }) => [a.name, a.is_loaded])).toEqual([
        ['beta', true],
      ]);

      const unload = await server.api('/v1/adapters/unload', { method: 'POST' });
      expect(await unload.json()).toEqual({
        adapter_name: 'beta',
        status: 'unloaded',
        message: 'Adapter beta unloaded successfully',
      });
      // The worker was asked to load alpha, load beta and drop alpha, then drop beta.
      expect(worker.asked.map((a) => `${a.kind} ${a.target.name}`)).toEqual([
        'load alpha',
        'load beta',
        'unload alpha',
        'unload beta',
      ]);
      const again = await server.api('/v1/adapters/unload', { method: 'POST' });
      expect(again.status).toBe(400);
      expect((await again.json()).error.code).toBe('no_adapter_loaded');
    } finally {
      await worker.stop();
    }
  });

  it('deletes an adapter with its files and unloads it', async () => {
    const { jobId, modelId } = await completedJob(server, { config: { output_name: 'gone' } });
    const file = await server.ctx.knex('files').where({ owner_id: jobId }).first();
    const worker = fakeServingWorker(server);
    await worker.ready();
    expect((await server.api('/v1/adapters/gone/load', { method: 'POST' })).status).toBe(200);
    await server.api(`/v1/models/${modelId}/activate`, { method: 'POST', json: {} });

    const res = await server.api('/v1/adapters/gone', { method: 'DELETE' });
    await worker.stop();
    expect(worker.asked.map((a) => `${a.kind} ${a.target.name}`)).toEqual(['load gone', 'unload gone']);
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({ adapter_name: 'gone', status: 'deleted' });
    await expect(stat(join(server.dataDir, 'files', file.rel_path))).rejects.toThrow();
    expect((await server.api('/v1/adapters/gone')).status).toBe(404);
    expect((await server.api(`/v1/models/${modelId}`)).status).toBe(404);
    const tenant = await server.ctx.knex('tenants').where({ id: 'default' }).first();
    expect(tenant).toMatchObject({ loaded_adapter: null, active_model_id: null });
  });

  it('refuses to delete an adapter a running job uses', async () => {
    const { jobId } = await completedJob(server, { config: { output_name: 'in-use' } });
    const mergeId = newId('job');
    await enqueueJob(server.ctx, server.ctx.knex, {
      id: mergeId,
      tenantId: 'default',
      kind: 'training',
      type: 'merge',
      config: {},
      parentJobId: jobId,
    });
    const res = await server.api('/v1/adapters/in-use', { method: 'DELETE' });
    expect(res.status).toBe(409);
    expect((await res.json()).error.code).toBe('conflict');
    await server.ctx.knex('jobs').where({ id: mergeId }).update({ status: 'completed' });
    expect((await server.api('/v1/adapters/in-use', { method: 'DELETE' })).status).toBe(200);
  });

  it('refuses to delete an adapter whose model a pending job was made from (source_model_id)', async () => {
    const { modelId } = await completedJob(server, {
      baseModel: 'smollm2-135m-instruct',
      config: { output_name: 'source-of-another' },
    });
    const res = await server.api('/v1/training/jobs', {
      method: 'POST',
      json: { source_model_id: modelId, train_texts: ['hello world'] },
    });
    expect(res.status).toBe(201);
    const job = await res.json();
    expect(job.parent_job_id).toBeNull();
    const refused = await server.api('/v1/adapters/source-of-another', { method: 'DELETE' });
    expect(refused.status).toBe(409);
    expect((await refused.json()).error.code).toBe('conflict');
    await server.ctx.knex('jobs').where({ id: job.id }).update({ status: 'cancelled' });
    expect((await server.api('/v1/adapters/source-of-another', { method: 'DELETE' })).status).toBe(200);
  });

  it('hides other tenants and refuses bad names', async () => {
    await completedJob(server, { config: { output_name: 'private' } });
    await completedJob(server, { tenantId: 'other-tenant', config: { output_name: 'theirs' } });
    for (const [method, path] of [
      ['GET', '/v1/adapters/private'],
      ['POST', '/v1/adapters/private/load'],
      ['DELETE', '/v1/adapters/private'],
    ] as const) {
      const res = await server.api(path, { method, key: server.otherKey });
      expect(res.status).toBe(404);
      expect((await res.json()).error).toMatchObject({ code: 'not_found', param: 'adapter_name' });
    }
    const theirs = await (await server.api('/v1/adapters', { key: server.otherKey })).json();
    expect(theirs.adapters.map((a: { name: string }) => a.name)).toEqual(['theirs']);
    expect((await server.api('/v1/adapters/theirs')).status).toBe(404);

    const bad = await server.api('/v1/adapters/bad%20name');
    expect(bad.status).toBe(400);
    expect((await bad.json()).error).toMatchObject({ code: 'invalid_request', param: 'adapter_name' });
    const badPage = await server.api('/v1/adapters?offset=-1');
    expect((await badPage.json()).error).toMatchObject({ code: 'invalid_request', param: 'offset' });
  });
});
