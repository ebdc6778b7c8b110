import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createKey } from '../src/auth.js';
import { newId } from '../src/ids.js';
import { rescueExpiredLeases } from '../src/queue/rescue.js';
import { storeDataset } from '../src/services/datasets.js';
import { fakeWorker } from './fake-worker.js';
import { recordSupportTrajectory } from './fixtures.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

/** Seed 000's request body, exactly as documented. */
const SEED_REQUEST = {
  tenant_id: 'default',
  name: 'ticket-triage v1',
  description: 'distill GPT-4o onto a 1B llama for support tickets',
  config: {
    teacher_model: 'openai/gpt-4o',
    student_model: 'llama-3.2-1b',
    num_prompts: 500,
    n_samples: 4,
    training_steps: 100,
    bond_beta: 0.5,
    bond_gamma: 0.1,
    temperature: 0.8,
    export_gguf: true,
    quantization_types: ['q4_k_m', 'q8_0'],
  },
};

describe.each(DATABASES)('distillation on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
    // recorded traffic: seed 000's create names no prompts, so they come from trajectories
    await recordSupportTrajectory(server);
  });
  afterAll(async () => {
    await server?.stop();
  });

  const create = (json: unknown, key?: string) =>
    server.api('/v1/distillation', { method: 'POST', json, key });
  const clearQueue = () =>
    server.ctx.knex('jobs').whereIn('status', ['pending', 'running']).update({ status: 'cancelled' });

  it("creates a job from seed 000's request, answering seed 000's shape", async () => {
    const res = await create(SEED_REQUEST);
    expect(res.status).toBe(201);
    const job = await res.json();
    expect(job).toMatchObject({
      name: 'ticket-triage v1',
      description: 'distill GPT-4o onto a 1B llama for support tickets',
      tenant_id: 'default',
      status: 'pending',
      phase: 'initializing',
      progress: {},
      results: {},
      cost_accrued: 0,
    });
    expect(job.id).toMatch(/^job_/);
    expect(job.created_at).toMatch(/Z$/);
    expect(job.config).toMatchObject({
      ...SEED_REQUEST.config,
      max_new_tokens: 128,
      learning_rate: 0.0002,
      lora_rank: 16,
      teacher: { provider: 'openai', model: 'gpt-4o', base_url: 'https://api.openai.com/v1' },
      student: { name: 'llama-3.2-1b', source: 'meta-llama/Llama-3.2-1B' },
    });
    const dataset = await server.ctx.knex('datasets').where({ id: job.config.dataset_id }).first();
    expect(dataset).toMatchObject({ source: 'trajectories', num_examples: 2, trajectory_count: 1 });
  });

  it('creates the curl example (no tenant_id) with defaults applied', async () => {
    const res = await create({
      name: 'demo',
      config: {
        teacher_model: 'openai/gpt-4o-mini',
        student_model: 'llama-3.2-1b',
        num_prompts: 50,
        training_steps: 30,
      },
    });
    expect(res.status).toBe(201);
    expect((await res.json()).config).toMatchObject({
      n_samples: 4,
      bond_beta: 0.5,
      export_gguf: false,
      quantization_types: [],
    });
  });

  it('hands the worker its spec, the teacher key and a prompts file; the key never shows', async () => {
    await clearQueue();
    const res = await create({
      name: 'inline',
      config: {
        teacher_model: 'openai/gpt-4o',
        teacher_api_key: 'sk-secret',
        student_model: 'smollm2-135m-instruct',
        prompts: ['one', 'two', 'three'],
        num_prompts: 2,
        training_steps: 5,
      },
    });
    expect(res.status).toBe(201);
    const job = await res.json();
    expect(JSON.stringify(job)).not.toContain('sk-secret');
    const claimed = (await fakeWorker(server).claim({ job_types: ['distill'], device: 'cpu' }))!;
    expect(claimed).toMatchObject({ job_id: job.id, kind: 'distillation', type: 'distill' });
    expect(claimed.spec).toMatchObject({
      teacher: {
        provider: 'openai',
        model: 'gpt-4o',
        base_url: 'https://api.openai.com/v1',
        api_key: 'sk-secret',
      },
      student: { name: 'smollm2-135m-instruct', source: 'HuggingFaceTB/SmolLM2-135M-Instruct' },
      base_model: { name: 'smollm2-135m-instruct' },
      num_prompts: 2,
      n_samples: 4,
      training_steps: 5,
      bond_beta: 0.5,
      bond_gamma: 0.1,
      temperature: 0.8,
      export_gguf: false,
    });
    expect(claimed.inputs.map((i) => [i.role, i.name])).toEqual([['prompts', 'prompts.jsonl']]);
    const prompts = await fakeWorker(server).download(claimed.inputs[0]!.download_url, claimed.lease_token);
    expect(await prompts.text()).toBe('{"prompt":"one"}\n{"prompt":"two"}\n');
    const got = await (await server.api(`/v1/distillation/${job.id}`)).json();
    expect(got).toMatchObject({ status: 'running', phase: 'initializing' });
    expect(got.started_at).not.toBeNull();
  });

  it('takes prompts from a dataset of any format', async () => {
    const dataset = await storeDataset(server.ctx, 'default', {
      name: 'chats',
      records: [
        {
          messages: [
            { role: 'user', content: 'hi' },
            { role: 'assistant', content: 'hello' },
          ],
        },
      ],
      source: 'upload',
    });
    const res = await create({
      config: { teacher_model: 'openai/gpt-4o', student_model: 'llama-3.2-1b', dataset_id: dataset.id },
    });
    expect(res.status).toBe(201);
    expect((await res.json()).config.dataset_id).toBe(dataset.id);
  });

  it('reads trajectories a page at a time, newest first, until it has num_prompts prompts', async () => {
    const key = await createKey(server.ctx.knex, { kind: 'user', tenantId: 'busy' });
    // 150 newest trajectories without a usable prompt, then 100 older ones with one each; every two
    // share a created_at, so pages must break ties the same way each time.
    const at = (i: number) => new Date(Date.UTC(2025, 0, 1) - Math.floor(i / 2) * 1000);
    await server.ctx.knex('trajectories').insert(
      Array.from({ length: 250 }, (_, i) => ({
        id: newId('traj'),
        tenant_id: 'busy',
        source: 'chat',
        status: 'completed',
        llm_calls: JSON.stringify(i < 150 ? [{ response: 'no prompt' }] : [{ user_prompt: `p${i}` }]),
        provider_accesses: JSON.stringify([]),
        metadata: JSON.stringify({}),
        llm_call_count: 1,
        created_at: at(i),
      })),
    );
    let rowsRead = 0;
    const count = (rows: unknown, query: { sql: string }) => {
      if (/from "trajectories"/i.test(query.sql) && Array.isArray(rows)) rowsRead += rows.length;
    };
    server.ctx.knex.on('query-response', count);
    let job: { config: { dataset_id: string } };
    try {
      const res = await create(
        { config: { teacher_model: 'openai/gpt-4o', student_model: 'llama-3.2-1b', num_prompts: 30 } },
        key,
      );
      expect(res.status).toBe(201);
      job = await res.json();
    } finally {
      server.ctx.knex.removeListener('query-response', count);
    }
    // Two pages of 100 reach the 30th prompt; the last 50 trajectories are never read.
    expect(rowsRead).toBe(200);
    const dataset = await server.ctx.knex('datasets').where({ id: job.config.dataset_id }).first();
    expect(dataset).toMatchObject({ num_examples: 30, trajectory_count: 30 });
    const file = await server.ctx.knex('files').where({ id: dataset.file_id }).first();
    const stored = await readFile(join(server.dataDir, 'files', file.rel_path), 'utf8');
    const prompts = stored
      .trim()
      .split('\n')
      .map((line) => JSON.parse(line).text);
    // Same-second pairs come back in id order, so compare as sets: the 30 newest with a prompt.
    expect(new Set(prompts)).toEqual(new Set(Array.from({ length: 30 }, (_, i) => `p${150 + i}`)));
  });

  it("refuses bad input with seed 000's codes and the field named", async () => {
    const config = SEED_REQUEST.config;
    const cases: [unknown, number, string, string | null][] = [
      [{ name: 'x' }, 400, 'invalid_config', 'config'],
      [{ config: { student_model: 'llama-3.2-1b' } }, 400, 'invalid_config', 'config.teacher_model'],
      [{ config: { ...config, n_samples: 0 } }, 400, 'invalid_config', 'config.n_samples'],
      [{ config: { ...config, training_steps: 'many' } }, 400, 'invalid_config', 'config.training_steps'],
      [
        { config: { ...config, quantization_types: ['q9_z'] } },
        400,
        'invalid_config',
        'config.quantization_types.0',
      ],
      [
        { config: { ...config, student_model: 'no such model' } },
        400,
        'invalid_config',
        'config.student_model',
      ],
      [{ config: { ...config, teacher_model: 'gpt-4o' } }, 400, 'invalid_config', 'config.teacher_model'],
      [
        { config: { ...config, teacher_model: 'acme/big-model' } },
        400,
        'invalid_config',
        'config.teacher_model',
      ],
      [
        { config: { ...config, dataset_id: 'ds_x', prompts: ['a'] } },
        400,
        'invalid_config',
        'config.prompts',
      ],
      [{ config: { ...config, dataset_id: 'ds_missing' } }, 404, 'not_found', 'dataset_id'],
      // fields that would be stored and never used: no GGUF written, no endpoint to send the key to
      [{ config: { ...config, export_gguf: false } }, 400, 'invalid_config', 'config.quantization_types'],
      [
        { config: { ...config, teacher_model: 'local/smollm2-360m-instruct', teacher_api_key: 'sk-x' } },
        400,
        'invalid_config',
        'config.teacher_api_key',
      ],
      [{ ...SEED_REQUEST, tenant_id: 'other-tenant' }, 403, 'permission_denied', 'tenant_id'],
    ];
    for (const [body, status, code, param] of cases) {
      const res = await create(body);
      const error = (await res.json()).error;
      expect({ body, status: res.status, code: error?.code, param: error?.param }).toEqual({
        body,
        status,
        code,
        param,
      });
    }
    // the seed's code is for a distillation's config; a bad query elsewhere stays invalid_request
    const list = await server.api('/v1/distillation?limit=0');
    expect((await list.json()).error).toMatchObject({ code: 'invalid_request', param: 'limit' });
    const noPrompts = await create({ config }, server.otherKey);
    expect(noPrompts.status).toBe(400);
    expect((await noPrompts.json()).error).toMatchObject({ code: 'invalid_config', param: 'config.prompts' });
  });

  it('leaves no files behind when a create fails after storing its prompts', async () => {
    const files = join(server.dataDir, 'files');
    const list = async (dir: string) => (await readdir(join(files, dir)).catch(() => [])).sort();
    const before = { datasets: await list('datasets'), jobs: await list('jobs') };
    // The NUL in the teacher key is refused by the job's insert, after the prompts dataset was written.
    const res = await create({
      config: {
        teacher_model: 'openai/gpt-4o',
        teacher_api_key: 'sk-\u0000',
        student_model: 'llama-3.2-1b',
        prompts: ['one', 'two'],
      },
    });
    expect(res.status).toBe(400);
    expect({ datasets: await list('datasets'), jobs: await list('jobs') }).toEqual(before);
  });

  it('refuses a job over budget with 402 insufficient_credits', async () => {
    await server.ctx
      .knex('tenants')
      .insert({ id: 'thrifty', budget_limit_usd: 0.001 })
      .onConflict('id')
      .merge();
    const key = await createKey(server.ctx.knex, { kind: 'user', tenantId: 'thrifty' });
    const res = await create(
      {
        config: {
          ...SEED_REQUEST.config,
          prompts: ['a long prompt'.repeat(100)],
          n_samples: 64,
          max_new_tokens: 4096,
        },
      },
      key,
    );
    expect(res.status).toBe(402);
    expect((await res.json()).error.code).toBe('insufficient_credits');
  });

  it('lists with tenant_id, status, limit and offset; hides other tenants', async () => {
    const page = await (await server.api('/v1/distillation?tenant_id=default&limit=1')).json();
    expect(page.jobs).toHaveLength(1);
    expect(page.has_more).toBe(true);
    const all = await (await server.api('/v1/distillation?limit=100')).json();
    expect(page.total).toBe(all.total);
    const second = await (await server.api('/v1/distillation?limit=1&offset=1')).json();
    expect(second.jobs[0].id).toBe(all.jobs[1].id);
    const running = await (await server.api('/v1/distillation?status=running')).json();
    expect(running.jobs.every((j: { status: string }) => j.status === 'running')).toBe(true);
    expect((await server.api('/v1/distillation?tenant_id=other-tenant')).status).toBe(403);
    expect((await server.api('/v1/distillation?status=training')).status).toBe(400);
    const theirs = await (await server.api('/v1/distillation', { key: server.otherKey })).json();
    expect(theirs).toEqual({ jobs: [], total: 0, has_more: false, next_cursor: null });
  });

  it("answers 404 job_not_found for unknown and other tenants' jobs, 403 for a foreign tenant_id", async () => {
    const job = await (await create(SEED_REQUEST)).json();
    for (const path of [
      `/v1/distillation/${job.id}`,
      `/v1/distillation/${job.id}/artifacts`,
      '/v1/distillation/job_nope',
    ]) {
      const res = await server.api(path, { key: path.endsWith('nope') ? undefined : server.otherKey });
      expect({ path, status: res.status, code: (await res.json()).error.code }).toEqual({
        path,
        status: 404,
        code: 'job_not_found',
      });
    }
    const cancel = await server.api(`/v1/distillation/${job.id}/cancel`, {
      method: 'POST',
      key: server.otherKey,
    });
    expect(cancel.status).toBe(404);
    expect((await server.api(`/v1/distillation/${job.id}?tenant_id=default`)).status).toBe(200);
    expect((await server.api(`/v1/distillation/${job.id}?tenant_id=other-tenant`)).status).toBe(403);
  });

  it('cancels pending at once, running on acknowledgement, and refuses terminal with 409 job_already_running', async () => {
    await clearQueue();
    const pending = await (await create(SEED_REQUEST)).json();
    const cancelled = await server.api(`/v1/distillation/${pending.id}/cancel?tenant_id=default`, {
      method: 'POST',
    });
    expect(await cancelled.json()).toMatchObject({ status: 'cancelled' });
    const again = await server.api(`/v1/distillation/${pending.id}/cancel`, { method: 'POST' });
    expect(again.status).toBe(409);
    expect((await again.json()).error.code).toBe('job_already_running');

    const job = await (await create(SEED_REQUEST)).json();
    const worker = fakeWorker(server);
    const claimed = (await worker.claim({ job_types: ['distill'], device: 'cpu' }))!;
    const asked = await (await server.api(`/v1/distillation/${job.id}/cancel`, { method: 'POST' })).json();
    expect(asked).toMatchObject({ status: 'running', cancel_requested: true });
    expect(await (await worker.heartbeat(job.id, claimed.lease_token)).json()).toMatchObject({
      cancel_requested: true,
    });
    await worker.cancelled(job.id, claimed.lease_token);
    expect(await (await server.api(`/v1/distillation/${job.id}`)).json()).toMatchObject({
      status: 'cancelled',
    });
  });

  it('shows phases, progress and artifacts as the worker produces them', async () => {
    await clearQueue();
    const job = await (await create(SEED_REQUEST)).json();
    const empty = await (await server.api(`/v1/distillation/${job.id}/artifacts?tenant_id=default`)).json();
    expect(empty).toEqual({
      job_id: job.id,
      adapter_path: null,
      gguf_paths: {},
      tokenizer_path: null,
      config_path: null,
      files: [],
    });

    const worker = fakeWorker(server);
    const claimed = (await worker.claim({ job_types: ['distill'], device: 'cpu' }))!;
    const token = claimed.lease_token;
    await worker.events(job.id, token, {
      phase: 'data_generation',
      progress: { prompts_done: 120, prompts_total: 500 },
    });
    await worker.heartbeat(job.id, token, { training_step: 45 });
    const running = await (await server.api(`/v1/distillation/${job.id}`)).json();
    expect(running).toMatchObject({
      status: 'running',
      phase: 'data_generation',
      progress: { prompts_done: 120, prompts_total: 500, training_step: 45 },
    });
    await worker.events(job.id, token, { phase: 'loading_model' }); // a training phase: ignored for a distillation
    expect((await (await server.api(`/v1/distillation/${job.id}`)).json()).phase).toBe('data_generation');

    for (const name of [
      'adapter_model.safetensors',
      'adapter_config.json',
      'tokenizer.json',
      'train_config.json',
      'model-q4_k_m.gguf',
      'model-q8_0.gguf',
    ]) {
      expect(
        (await worker.upload(job.id, token, 'outputs', name, Buffer.from(`bytes of ${name}`))).status,
      ).toBe(201);
    }
    await worker.events(job.id, token, { phase: 'done' });
    expect((await worker.complete(job.id, token, { loss_final: 0.2, samples_kept: 400 })).status).toBe(200);

    const done = await (await server.api(`/v1/distillation/${job.id}`)).json();
    expect(done).toMatchObject({
      status: 'completed',
      phase: 'done',
      results: { loss_final: 0.2, samples_kept: 400 },
    });
    const artifacts = await (await server.api(`/v1/distillation/${job.id}/artifacts`)).json();
    const dir = `files/jobs/${job.id}/outputs`; // relative to the data directory, never absolute
    expect(artifacts).toMatchObject({
      adapter_path: `${dir}/`,
      gguf_paths: { q4_k_m: `${dir}/model-q4_k_m.gguf`, q8_0: `${dir}/model-q8_0.gguf` },
      tokenizer_path: `${dir}/tokenizer.json`,
      config_path: `${dir}/train_config.json`,
    });
    expect(artifacts.files).toHaveLength(6);
    const gguf = artifacts.files.find((f: { name: string }) => f.name === 'model-q8_0.gguf');
    expect(gguf.download_url).toBe(`/v1/distillation/${job.id}/artifacts/model-q8_0.gguf`);
    const part = await server.api(gguf.download_url, { headers: { range: 'bytes=9-' } });
    expect(part.status).toBe(206);
    expect(await part.text()).toBe('model-q8_0.gguf');
    expect((await server.api(gguf.download_url, { key: server.otherKey })).status).toBe(404);
    expect((await server.api(`/v1/distillation/${job.id}/artifacts/missing.gguf`)).status).toBe(404);
  });

  it("pages the worker's logs and metrics as the training endpoints do", async () => {
    await clearQueue();
    const job = await (await create(SEED_REQUEST)).json();
    const worker = fakeWorker(server);
    const token = (await worker.claim({ job_types: ['distill'], device: 'cpu' }))!.lease_token;
    const lines = [1, 2, 3].map((seq) => ({ seq, text: `step ${seq}/100 · loss ${1 / seq}` }));
    expect((await worker.logs(job.id, token, lines)).status).toBe(200);
    const points = [1, 2, 3].map((step) => ({ step, phase: 'train', loss: 1 / step, lr: 2e-4 }));
    expect((await worker.metrics(job.id, token, points)).status).toBe(200);

    const logs = await (await server.api(`/v1/distillation/${job.id}/logs?tenant_id=default`)).json();
    expect(logs).toMatchObject({ job_id: job.id, latest_seq: 3 });
    expect(logs.lines.map((l: { text: string }) => l.text)).toEqual(lines.map((l) => l.text));
    const tail = await (await server.api(`/v1/distillation/${job.id}/logs?since=1&tail=1`)).json();
    expect(tail.lines.map((l: { seq: number }) => l.seq)).toEqual([3]);

    const metrics = await (await server.api(`/v1/distillation/${job.id}/metrics?since_step=1`)).json();
    expect(metrics).toMatchObject({ job_id: job.id, count: 2, latest_step: 3 });
    expect(metrics.points.map((p: { step: number; loss: number }) => [p.step, p.loss])).toEqual([
      [2, 0.5],
      [3, 1 / 3],
    ]);
    for (const path of ['logs', 'metrics']) {
      const foreign = await server.api(`/v1/distillation/${job.id}/${path}`, { key: server.otherKey });
      expect((await foreign.json()).error.code).toBe('job_not_found');
      expect((await server.api(`/v1/distillation/${job.id}/${path}?tenant_id=other`)).status).toBe(403);
    }
    expect((await server.api(`/v1/distillation/${job.id}/logs?tail=0`)).status).toBe(400);
    expect((await server.api(`/v1/distillation/${job.id}/metrics?limit=0`)).status).toBe(400);
  });

  it("bills the teacher's tokens at the configured price per teacher model", async () => {
    await clearQueue();
    const { config } = server.ctx;
    const saved = { teacherPrices: config.teacherPrices, pricePerGpuHour: config.pricePerGpuHour };
    // worker time free, so cost_accrued is the teacher's alone
    Object.assign(config, { teacherPrices: { 'openai/gpt-4o': 2.5, '*': 10 }, pricePerGpuHour: 0 });
    try {
      const mini = {
        ...SEED_REQUEST,
        config: { ...SEED_REQUEST.config, teacher_model: 'openai/gpt-4o-mini' },
      };
      expect((await (await create(mini)).json()).config.teacher_usd_per_million_tokens).toBe(10);
      await clearQueue();
      const job = await (await create(SEED_REQUEST)).json();
      expect(job.config.teacher_usd_per_million_tokens).toBe(2.5);
      const worker = fakeWorker(server);
      const token = (await worker.claim({ job_types: ['distill'], device: 'cpu' }))!.lease_token;
      const cost = async () => (await (await server.api(`/v1/distillation/${job.id}`)).json()).cost_accrued;

      await worker.events(job.id, token, { phase: 'data_generation', progress: { teacher_tokens: 400_000 } });
      expect(await cost()).toBe(1);
      await worker.heartbeat(job.id, token, { teacher_tokens: 600_000 });
      expect(await cost()).toBe(1.5);
      await worker.heartbeat(job.id, token, { training_step: 3 }); // no teacher count: nothing billed
      await worker.heartbeat(job.id, token, { teacher_tokens: 600_000 }); // a repeat: nothing new
      expect(await cost()).toBe(1.5);
      // resumed from a checkpoint at 200k: the tokens after it are paid (and billed) again
      await worker.events(job.id, token, { progress: { teacher_tokens: 200_000 } });
      await worker.events(job.id, token, { progress: { teacher_tokens: 300_000 } });
      expect(await cost()).toBe(1.75);
      await worker.complete(job.id, token, {});
      expect(await cost()).toBe(1.75);
    } finally {
      Object.assign(config, saved);
    }
  });

  it("keeps the last checkpoint's adapter of a cancelled or failed job as its artifacts", async () => {
    for (const end of ['cancelled', 'failed'] as const) {
      await clearQueue();
      const job = await (await create(SEED_REQUEST)).json();
      const worker = fakeWorker(server);
      const token = (await worker.claim({ job_types: ['distill'], device: 'cpu' }))!.lease_token;
      // what the worker publishes with each training checkpoint
      for (const name of ['adapter_model.safetensors', 'adapter_config.json', 'tokenizer.json'])
        await worker.upload(job.id, token, 'outputs', name, Buffer.from(`step 50 ${name}`));
      if (end === 'cancelled') {
        await server.api(`/v1/distillation/${job.id}/cancel`, { method: 'POST' });
        await worker.cancelled(job.id, token);
      } else {
        await worker.fail(job.id, token, { code: 'training_error', message: 'CUDA error' }, false);
      }
      expect((await (await server.api(`/v1/distillation/${job.id}`)).json()).status).toBe(end);
      const artifacts = await (await server.api(`/v1/distillation/${job.id}/artifacts`)).json();
      expect(artifacts.adapter_path).toBe(`files/jobs/${job.id}/outputs/`);
      expect(artifacts.gguf_paths).toEqual({});
      const adapter = artifacts.files.find((f: { name: string }) => f.name === 'adapter_model.safetensors');
      expect(await (await server.api(adapter.download_url)).text()).toBe('step 50 adapter_model.safetensors');
    }
  });

  it('fails a job whose worker died on its last attempt with training_error, as seed 000 lists it', async () => {
    await clearQueue();
    const job = await (await create(SEED_REQUEST)).json();
    const worker = fakeWorker(server);
    await worker.claim({ job_types: ['distill'], device: 'cpu' });
    // the worker is gone: its lease has run out on the last allowed attempt
    await server.ctx
      .knex('jobs')
      .where({ id: job.id })
      .update({ max_attempts: 1, lease_expires_at: server.ctx.knex.raw("now() - interval '1 second'") });
    expect(await rescueExpiredLeases(server.ctx, 10)).toMatchObject({ failed: 1 });
    const failed = await (await server.api(`/v1/distillation/${job.id}`)).json();
    expect(failed).toMatchObject({ status: 'failed', error: { code: 'training_error' } });
    expect(failed.error.message).toMatch(/lease expired/);
  });

  it('lists checkpoints and resumes a cancelled job from one, with the teacher key given again', async () => {
    await clearQueue();
    const withKey = { ...SEED_REQUEST, config: { ...SEED_REQUEST.config, teacher_api_key: 'sk-first' } };
    const job = await (await create(withKey)).json();
    const worker = fakeWorker(server);
    const token = (await worker.claim({ job_types: ['distill'], device: 'cpu' }))!.lease_token;
    const notTerminal = await server.api(`/v1/distillation/${job.id}/resume`, { method: 'POST', json: {} });
    expect(notTerminal.status).toBe(409);
    expect((await notTerminal.json()).error.code).toBe('job_not_resumable');
    await worker.upload(job.id, token, 'checkpoints', 'generation-25', Buffer.from('samples'), 0);
    await worker.upload(job.id, token, 'checkpoints', 'checkpoint-50', Buffer.from('adapter'), 50);
    await server.api(`/v1/distillation/${job.id}/cancel`, { method: 'POST' });
    await worker.cancelled(job.id, token);

    const list = await (await server.api(`/v1/distillation/${job.id}/checkpoints?tenant_id=default`)).json();
    expect(list.job_id).toBe(job.id);
    expect(list.checkpoints.map((c: { name: string; step: number }) => [c.name, c.step])).toEqual([
      ['generation-25', 0],
      ['checkpoint-50', 50],
    ]);
    const unknown = await server.api(`/v1/distillation/${job.id}/resume`, {
      method: 'POST',
      json: { checkpoint: 'checkpoint-99' },
    });
    expect(unknown.status).toBe(404);
    const resumed = await server.api(`/v1/distillation/${job.id}/resume?tenant_id=default`, {
      method: 'POST',
      json: { checkpoint: 'generation-25', teacher_api_key: 'sk-again' },
    });
    expect(resumed.status).toBe(200);
    const body = await resumed.text();
    expect(JSON.parse(body)).toMatchObject({
      id: job.id,
      status: 'pending',
      phase: 'initializing',
      error: null,
    });
    expect(body).not.toContain('sk-again');

    const again = (await worker.claim({ job_types: ['distill'], device: 'cpu' }))!;
    expect(again.job_id).toBe(job.id);
    expect(again.resume_from).toMatchObject({ name: 'generation-25', step: 0 });
    expect((again.spec.teacher as { api_key: string }).api_key).toBe('sk-again');
    for (const path of ['checkpoints', 'resume']) {
      const foreign = await server.api(`/v1/distillation/${job.id}/${path}`, {
        key: server.otherKey,
        ...(path === 'resume' ? { method: 'POST', json: {} } : {}),
      });
      expect(foreign.status).toBe(404);
    }
  });

  it('refuses a teacher key when resuming a job whose teacher is local', async () => {
    await clearQueue();
    const created = await create({
      config: {
        teacher_model: 'local/smollm2-360m-instruct',
        student_model: 'smollm2-135m-instruct',
        prompts: ['one', 'two'],
        num_prompts: 2,
        training_steps: 5,
      },
    });
    expect(created.status).toBe(201);
    const job = await created.json();
    const worker = fakeWorker(server);
    const token = (await worker.claim({ job_types: ['distill'], device: 'cpu' }))!.lease_token;
    await server.api(`/v1/distillation/${job.id}/cancel`, { method: 'POST' });
    await worker.cancelled(job.id, token);
    const resumed = await server.api(`/v1/distillation/${job.id}/resume`, {
      method: 'POST',
      json: { teacher_api_key: 'sk-unused' },
    });
    expect(resumed.status).toBe(400);
    expect((await resumed.json()).error).toMatchObject({ code: 'invalid_config', param: 'teacher_api_key' });
  });

  it('keeps every phase in the timeline, including ones no poll saw', async () => {
    await clearQueue();
    const job = await (await create(SEED_REQUEST)).json();
    const worker = fakeWorker(server);
    const token = (await worker.claim({ job_types: ['distill'], device: 'cpu' }))!.lease_token;
    // Nobody polls the job between these: the timeline alone remembers them.
    for (const phase of ['data_generation', 'curation', 'training', 'export', 'done'])
      await worker.events(job.id, token, { phase });
    expect((await worker.complete(job.id, token, {})).status).toBe(200);

    const res = await server.api(`/v1/distillation/${job.id}/events?tenant_id=default`);
    expect(res.status).toBe(200);
    const { job_id, events } = await res.json();
    expect(job_id).toBe(job.id);
    const kinds = events.map((e: { kind: string }) => e.kind);
    expect(kinds[0]).toBe('created');
    expect(kinds).toContain('claimed');
    expect(kinds.at(-1)).toBe('completed');
    const phases = events
      .filter((e: { kind: string }) => e.kind === 'phase')
      .map((e: { payload: { phase: string } }) => e.payload.phase);
    expect(phases).toEqual(['data_generation', 'curation', 'training', 'export', 'done']);
    const seqs = events.map((e: { seq: number }) => e.seq);
    expect(seqs).toEqual([...seqs].sort((a, b) => a - b));

    const since = await (await server.api(`/v1/distillation/${job.id}/events?since=${seqs.at(-2)}`)).json();
    expect(since.events).toEqual([events.at(-1)]);
    expect((await server.api(`/v1/distillation/${job.id}/events`, { key: server.otherKey })).status).toBe(
      404,
    );
    expect((await server.api(`/v1/distillation/${job.id}/events?tenant_id=other`)).status).toBe(403);
    // A training job's timeline is not a distillation job's.
    const training = await server.api('/v1/training/jobs', {
      method: 'POST',
      json: { base_model: 'smollm2-135m-instruct', train_texts: ['hi'], max_steps: 1 },
    });
    const trainingId = (await training.json()).id;
    expect((await server.api(`/v1/distillation/${trainingId}/events`)).status).toBe(404);
  });
});
