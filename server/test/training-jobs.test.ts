import { mkdir, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { storeDataset } from '../src/services/datasets.js';
import { serializeTrainingJob } from '../src/services/jobs.js';
import { createFinetune, fakeWorker, sleep } from './fake-worker.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

const chatRecord = {
  messages: [
    { role: 'user', content: 'q' },
    { role: 'assistant', content: 'a' },
  ],
};

describe.each(DATABASES)('training jobs on %s', (db) => {
  let server: TestServer;
  let datasetId: string;
  let otherDatasetId: string;
  beforeAll(async () => {
    server = await startTestServer(db);
    datasetId = (
      await storeDataset(server.ctx, 'default', {
        name: 'ds',
        records: [{ text: 'a' }, { text: 'b' }, { text: 'c' }],
        source: 'inline',
      })
    ).id;
    otherDatasetId = (
      await storeDataset(server.ctx, 'other-tenant', {
        name: 'theirs',
        records: [{ text: 'x' }],
        source: 'inline',
      })
    ).id;
  });
  afterAll(async () => {
    await server?.stop();
  });

  const create = (
    json: Record<string, unknown>,
    init: { key?: string; headers?: Record<string, string> } = {},
  ) => server.api('/v1/training/jobs', { method: 'POST', json, ...init });
  const jobRow = (id: string) => server.ctx.knex('jobs').where({ id }).first();

  describe('create', () => {
    it('keeps flat fields when nested objects are sent too (validator defaults do not override them)', async () => {
      const res = await create({
        base_model: 'tiny/model',
        dataset_id: datasetId,
        eval_split: 0.25,
        max_steps: 7,
        learning_rate: 0.005,
        lora_rank: 4,
        training_config: { batch_size: 2 },
        lora_config: { lora_dropout: 0.1 },
      });
      expect(res.status).toBe(201);
      const { config } = await res.json();
      expect(config.training).toMatchObject({
        eval_split: 0.25,
        max_steps: 7,
        learning_rate: 0.005,
        batch_size: 2,
      });
      expect(config.lora).toMatchObject({ r: 4, dropout: 0.1 });
    });

    it('runs distributed data-parallel on one node, gang-schedules several, refuses distributed: false with several', async () => {
      const one = await create({
        base_model: 'tiny/model',
        dataset_id: datasetId,
        distributed: true,
        num_nodes: 1,
      });
      expect(one.status).toBe(201);
      expect((await one.json()).config.distributed).toEqual({ enabled: true, num_nodes: 1 });
      const many = await create({ base_model: 'tiny/model', dataset_id: datasetId, num_nodes: 2 });
      expect(many.status).toBe(201);
      const job = await many.json();
      expect(job.config.distributed).toEqual({ enabled: true, num_nodes: 2 });
      expect((await server.api(`/v1/training/jobs/${job.id}/cancel`, { method: 'POST' })).status).toBe(200);
      expect((await jobRow(job.id)).num_nodes).toBe(2);
      const contradiction = await create({
        base_model: 'tiny/model',
        dataset_id: datasetId,
        distributed: false,
        num_nodes: 2,
      });
      expect(contradiction.status).toBe(400);
      expect((await contradiction.json()).error).toMatchObject({
        code: 'invalid_config',
        param: 'distributed',
      });
    });

    it('takes seed 003 fields: model_name, train_texts, nested configs, output_dir', async () => {
      const res = await create({
        model_name: 'smollm2-135m-instruct',
        train_texts: ['### Instruction:\nSay hi\n\n### Response:\nhi'],
        lora_config: { r: 4, lora_alpha: 8, lora_dropout: 0.05, target_modules: ['q_proj', 'v_proj'] },
        training_config: {
          num_epochs: 3,
          batch_size: 1,
          max_steps: -1,
          gradient_accumulation_steps: 4,
          save_steps: 500,
        },
        output_dir: './custom_output',
      });
      expect(res.status).toBe(201);
      const job = await res.json();
      expect(job).toMatchObject({
        job_id: job.id,
        type: 'finetune',
        method: 'lora',
        status: 'pending',
        phase: 'queued',
        base_model: 'smollm2-135m-instruct',
        model_name: 'smollm2-135m-instruct',
        progress: 0,
        current_step: 0,
        total_steps: 1,
        retries: 0,
        last_checkpoint_step: 0,
        output_model_id: null,
        started_at: null,
        finished_at: null,
      });
      expect(job.dataset_id).toMatch(/^ds_/);
      expect(job.config).toMatchObject({
        output_name: 'custom_output',
        base_model: { name: 'smollm2-135m-instruct', source: 'HuggingFaceTB/SmolLM2-135M-Instruct' },
        lora: { r: 4, alpha: 8, dropout: 0.05, target_modules: ['q_proj', 'v_proj'], bias: 'none' },
        training: { num_epochs: 3, batch_size: 1, gradient_accumulation_steps: 4, learning_rate: 0.0002 },
        dataset_format: 'text',
      });
    });

    it('takes seed 001 flat fields with a dataset_path, and keeps hf_token for workers only', async () => {
      await mkdir(join(server.dataDir, 'datasets'), { recursive: true });
      await writeFile(
        join(server.dataDir, 'datasets', 'alpaca.jsonl'),
        `${[1, 2, 3, 4, 5, 6, 7, 8, 9, 10].map((i) => JSON.stringify({ prompt: `q${i}`, completion: `a${i}` })).join('\n')}\n`,
      );
      const res = await create({
        base_model: 'Qwen/Qwen2.5-7B-Instruct',
        dataset_path: 'alpaca.jsonl',
        method: 'lora',
        num_epochs: 3,
        batch_size: 4,
        lora_rank: 16,
        eval_split: 0.1,
        hf_token: 'hf_secret',
        run_name: 'alpaca-7b-run1',
        wandb_project: 'my-project',
      });
      expect(res.status).toBe(201);
      const job = await res.json();
      expect(job.run_name).toBe('alpaca-7b-run1');
      expect(job.total_steps).toBe(7); // ceil(3 × 9 / 4), one of ten held out
      expect(job.config.training).toMatchObject({ num_epochs: 3, batch_size: 4, eval_split: 0.1 });
      expect(JSON.stringify(job)).not.toContain('hf_secret');
      const dataset = await server.ctx.knex('datasets').where({ id: job.dataset_id }).first();
      expect(dataset).toMatchObject({ name: 'alpaca.jsonl', num_examples: 10, format: 'prompt_completion' });
      // sealed at rest (test/secrets.test.ts checks the claim opens it)
      expect((await jobRow(job.id)).secrets).toMatchObject({ v: 1 });
      expect(JSON.stringify(await jobRow(job.id))).not.toContain('hf_secret');
    });

    it("takes a dataset_path naming a file uploaded through the API, the caller's only", async () => {
      const upload = (path: string, name: string, key?: string) => {
        const form = new FormData();
        if (path === '/openai/v1/files') form.append('purpose', 'fine-tune');
        form.append('file', new Blob([`${JSON.stringify(chatRecord)}\n`]), name);
        return server.api(path, { method: 'POST', body: form, ...(key ? { key } : {}) });
      };
      const mine = await (await upload('/v1/datasets', 'my-upload.jsonl')).json();
      const openai = await (await upload('/openai/v1/files', 'openai-upload.jsonl')).json();
      const theirs = await (await upload('/v1/datasets', 'their-upload.jsonl', server.otherKey)).json();
      const base = { base_model: 'smollm2-135m-instruct' };
      for (const [path, id] of [
        ['my-upload.jsonl', mine.id],
        [mine.id, mine.id],
        ['openai-upload.jsonl', openai.id],
        [openai.id, openai.id],
      ]) {
        const res = await create({ ...base, dataset_path: path });
        expect(res.status).toBe(201);
        const job = await res.json();
        // the upload itself is trained on, not a copy of it
        expect(job.dataset_id).toBe(id);
        expect(job.config.dataset_format).toBe('chat');
        await server.api(`/v1/training/jobs/${job.id}/cancel`, { method: 'POST' });
      }
      for (const path of ['their-upload.jsonl', theirs.id]) {
        const res = await create({ ...base, dataset_path: path });
        expect(res.status).toBe(400);
        const err = (await res.json()).error;
        expect(err).toMatchObject({ code: 'invalid_config', param: 'dataset_path' });
        expect(err.message).toMatch(/No uploaded dataset/);
      }
    });

    it('trains on the newest dataset when no data is given (seed 004), 400 no_dataset without one', async () => {
      const { createKey } = await import('../src/auth.js');
      const key = await createKey(server.ctx.knex, { kind: 'user', tenantId: 'no-data' });
      const bodies = [
        { base_model: 'smollm2-135m-instruct' },
        { backend: 'native', base_model: 'task-model', prompt_optimization: { teacher_model: 't' } },
      ];
      for (const body of bodies) {
        const res = await create(body, { key });
        expect(res.status, JSON.stringify(body)).toBe(400);
        expect((await res.json()).error).toMatchObject({ code: 'no_dataset', param: 'dataset_id' });
      }
      const store = (name: string) =>
        storeDataset(server.ctx, 'no-data', { name, records: [chatRecord], source: 'inline' });
      await store('older');
      const newest = await store('newest');
      for (const body of bodies) {
        const res = await create(body, { key });
        expect(res.status, JSON.stringify(body)).toBe(201);
        const job = await res.json();
        expect(job.dataset_id).toBe(newest.id);
        await server.api(`/v1/training/jobs/${job.id}/cancel`, { method: 'POST', key });
      }
    });

    it('takes settings flat, as hyperparams and nested, combined (one setting twice must agree)', async () => {
      const base = { base_model: 'smollm2-135m-instruct', dataset_id: datasetId };
      const flatOnly = await (await create({ ...base, lora_rank: 4, learning_rate: 0.1 })).json();
      expect(flatOnly.config.lora.r).toBe(4);
      expect(flatOnly.config.training.learning_rate).toBe(0.1);
      const withHyper = await (
        await create({ ...base, lora_alpha: 32, hyperparams: { lora_rank: 8, lr: 0.01, steps: 50 } })
      ).json();
      expect(withHyper.config.lora).toMatchObject({ r: 8, alpha: 32 });
      expect(withHyper.config.training).toMatchObject({ learning_rate: 0.01, max_steps: 50 });
      expect(withHyper.total_steps).toBe(50);
      const mixed = await (
        await create({
          ...base,
          lora_rank: 16,
          hyperparams: { lr: 0.01, steps: 20 },
          lora_config: { r: 16, lora_dropout: 0.1 },
          training_config: { batch_size: 2, max_steps: 20 },
        })
      ).json();
      expect(mixed.config.lora).toMatchObject({ r: 16, dropout: 0.1 });
      expect(mixed.config.training).toMatchObject({ learning_rate: 0.01, batch_size: 2, max_steps: 20 });
    });

    it('starts from a template, which the request overrides', async () => {
      // the template's qlora needs an online CUDA worker that runs it
      const gpu = {
        id: `gpu-${db}`,
        capabilities: JSON.stringify({ job_types: ['finetune'], device: 'cuda' }),
      };
      await server.ctx.knex('workers').insert(gpu);
      const res = await create({ template: 'qlora-7b', dataset_id: datasetId, lora_rank: 8 });
      await server.ctx.knex('workers').where({ id: gpu.id }).delete();
      expect(res.status).toBe(201);
      const job = await res.json();
      expect(job).toMatchObject({ method: 'qlora', base_model: 'qwen2.5-7b-instruct' });
      expect(job.config.lora).toMatchObject({ r: 8, alpha: 16 });
      expect(job.config.training).toMatchObject({
        use_gradient_checkpointing: true,
        gradient_accumulation_steps: 4,
      });
    });

    it('takes seed 002 runs (train with base_model_id and hyperparams) with idempotency keys', async () => {
      const body = {
        type: 'train',
        idempotency_key: 'run-1',
        base_model_id: 'bm_smollm2-135m-instruct',
        dataset_id: datasetId,
        hyperparams: { turns: 2, output_name: 'my-model', new_layers: 2 },
      };
      const first = await create(body);
      expect(first.status).toBe(201);
      const job = await first.json();
      expect(job).toMatchObject({
        type: 'train',
        method: null,
        status: 'pending',
        retries: 0,
        output_model_id: null,
      });
      expect(job.config).toMatchObject({ turns: 2, output_name: 'my-model', growth: { new_layers: 2 } });
      const repeat = await create(body);
      expect(repeat.status).toBe(201);
      expect((await repeat.json()).id).toBe(job.id);
      const header = await create(
        { ...body, idempotency_key: undefined },
        { headers: { 'idempotency-key': 'run-1' } },
      );
      expect((await header.json()).id).toBe(job.id);
      const changed = await create({ ...body, hyperparams: { turns: 3 } });
      expect(changed.status).toBe(409);
      expect((await changed.json()).error).toMatchObject({
        code: 'idempotency_conflict',
        param: 'idempotency_key',
      });
    });

    it('answers a repeat that races the first create with the job or 409 request_in_progress, never 404', async () => {
      const body = { base_model: 'tiny/model', dataset_id: datasetId, idempotency_key: 'race-1' };
      const jobsBefore = Number((await server.ctx.knex('jobs').count({ n: '*' }))[0]!.n);
      // On Postgres, hold the first create inside its transaction (its job insert waits on this lock)
      // after its key row is committed, so the repeats surely arrive while the job does not exist yet.
      // PGlite runs one query at a time: there the requests only interleave as they happen to.
      const lock = db === 'postgres' ? await server.ctx.knex.transaction() : null;
      await lock?.raw('LOCK TABLE jobs IN EXCLUSIVE MODE');
      const first = create(body);
      if (lock) {
        while (!(await server.ctx.knex('idempotency_keys').where({ key: 'race-1' }).first())) await sleep(10);
      }
      const repeats = await Promise.all([create(body), create(body)]);
      await lock?.commit();
      const created = await first;
      expect(created.status).toBe(201);
      const { id } = await created.json();
      for (const res of repeats) {
        const answer = await res.json();
        if (lock || res.status !== 201) {
          expect({ status: res.status, code: answer.error?.code }).toEqual({
            status: 409,
            code: 'request_in_progress',
          });
        } else expect(answer.id).toBe(id);
      }
      expect(Number((await server.ctx.knex('jobs').count({ n: '*' }))[0]!.n)).toBe(jobsBefore + 1);
      // Once the first has finished, a repeat answers its job.
      const later = await create(body);
      expect(later.status).toBe(201);
      expect((await later.json()).id).toBe(id);
    });

    it('leaves no dataset files behind when a create fails after storing its data', async () => {
      const datasets = join(server.dataDir, 'files', 'datasets');
      const before = (await readdir(datasets)).sort();
      // The NUL in hf_token is refused by the job's insert, after the inline data was written.
      const res = await create({
        base_model: 'smollm2-135m-instruct',
        train_texts: ['hi'],
        hf_token: 'hf_\u0000x',
      });
      expect(res.status).toBe(400);
      expect((await readdir(datasets)).sort()).toEqual(before);
    });

    it('pins the device from seed 004 backend', async () => {
      const job = await (
        await create({
          base_model: 'smollm2-135m-instruct',
          dataset_id: datasetId,
          backend: 'cuda',
          max_steps: 5,
        })
      ).json();
      expect((await jobRow(job.id)).required_device).toBe('cuda');
    });

    it('makes backend native a prompt-optimization job, its teacher key only in the claim', async () => {
      const native = {
        backend: 'native',
        base_model: 'task-model',
        dataset_id: datasetId,
        max_steps: 2,
        prompt_optimization: {
          teacher_model: 'gpt-x',
          teacher_base_url: 'http://127.0.0.1:9/v1',
          teacher_api_key: 'sk-native-secret',
          metric: 'llm_judge',
        },
      };
      const res = await create(native);
      expect(res.status).toBe(201);
      const text = await res.text();
      expect(text).not.toContain('sk-native-secret');
      const job = JSON.parse(text);
      expect(job.type).toBe('prompt_optimize');
      expect(job.config).toMatchObject({
        type: 'prompt_optimize',
        teacher: { provider: 'openai', model: 'gpt-x', base_url: 'http://127.0.0.1:9/v1' },
        task_model: 'task-model',
        metric: 'llm_judge',
        iterations: 2,
      });
      const row = await jobRow(job.id);
      expect(JSON.stringify(row.config)).not.toContain('sk-native-secret');
      const claimed = await fakeWorker(server, 'po-worker').claim({
        job_types: ['prompt_optimize'],
        device: 'cpu',
      });
      expect(claimed?.job_id).toBe(job.id);
      expect(claimed?.spec.teacher).toMatchObject({ model: 'gpt-x', api_key: 'sk-native-secret' });
      expect(claimed?.inputs.map((i) => i.role)).toEqual(['dataset']);
      await server.api(`/v1/training/jobs/${job.id}/cancel`, { method: 'POST' });
    });

    it('refuses backend native without its teacher, or with fields it would ignore', async () => {
      const cases: [Record<string, unknown>, string][] = [
        [{ backend: 'native', dataset_id: datasetId }, 'prompt_optimization.teacher_model'],
        [
          { backend: 'native', dataset_id: datasetId, prompt_optimization: { metric: 'exact_match' } },
          'prompt_optimization',
        ],
        [
          {
            backend: 'native',
            dataset_id: datasetId,
            learning_rate: 0.1,
            prompt_optimization: { teacher_model: 't' },
          },
          'learning_rate',
        ],
        [
          {
            backend: 'native',
            dataset_id: datasetId,
            prompt_optimization: { teacher_model: 't', teacher_base_url: 'ftp://x/v1' },
          },
          'prompt_optimization.teacher_base_url',
        ],
        [
          {
            backend: 'native',
            dataset_id: datasetId,
            max_steps: 51,
            prompt_optimization: { teacher_model: 't' },
          },
          'max_steps',
        ],
        [
          {
            base_model: 'smollm2-135m-instruct',
            dataset_id: datasetId,
            prompt_optimization: { teacher_model: 't' },
          },
          'prompt_optimization',
        ],
      ];
      for (const [body, param] of cases) {
        const res = await create(body);
        expect(res.status, JSON.stringify(body)).toBe(400);
        const { error } = await res.json();
        expect(
          error.code === 'invalid_config' || error.code === 'invalid_request',
          JSON.stringify(error),
        ).toBe(true);
        expect(error.param, JSON.stringify(error)).toContain(param);
      }
    });

    it('takes backend mlx only while an online worker announces it', async () => {
      const mlx = { base_model: 'smollm2-135m-instruct', dataset_id: datasetId, backend: 'mlx' };
      const refused = await create(mlx);
      expect(refused.status).toBe(400);
      expect((await refused.json()).error).toMatchObject({ code: 'backend_unavailable', param: 'backend' });
      // a stale mlx worker does not count
      const workers = server.ctx.knex('workers');
      await workers.clone().insert({
        id: 'mac-1',
        capabilities: JSON.stringify({ job_types: ['finetune'], device: 'mlx' }),
        last_seen_at: server.ctx.knex.raw("now() - interval '1 hour'"),
      });
      expect((await create(mlx)).status).toBe(400);
      await workers.clone().where({ id: 'mac-1' }).update({ last_seen_at: server.ctx.knex.fn.now() });
      const accepted = await create(mlx);
      expect(accepted.status).toBe(201);
      expect((await jobRow((await accepted.json()).id)).required_device).toBe('mlx');
      await workers.clone().where({ id: 'mac-1' }).delete();
    });

    it('refuses bad input with the field named', async () => {
      const cases: [Record<string, unknown>, number, string, string][] = [
        [{ train_texts: ['a'] }, 400, 'invalid_config', 'base_model'],
        [{ base_model: 'no such model', train_texts: ['a'] }, 400, 'invalid_config', 'base_model'],
        [
          { base_model: 'smollm2-135m-instruct', train_texts: ['a'], batch_size: 'four' },
          400,
          'invalid_request',
          'batch_size',
        ],
        [
          { base_model: 'smollm2-135m-instruct', train_texts: ['a'], lora_rank: 0 },
          400,
          'invalid_request',
          'lora_rank',
        ],
        [
          { base_model: 'smollm2-135m-instruct', train_texts: ['a'], method: 'dora' },
          400,
          'invalid_request',
          'method',
        ],
        [{ base_model: 'smollm2-135m-instruct', train_texts: [] }, 400, 'invalid_request', 'train_texts'],
        [
          { base_model: 'smollm2-135m-instruct', train_texts: ['a'], surprise: 1 },
          400,
          'invalid_request',
          'surprise',
        ],
        [
          { base_model: 'smollm2-135m-instruct', dataset_path: '../../etc/passwd' },
          400,
          'invalid_config',
          'dataset_path',
        ],
        [
          { base_model: 'smollm2-135m-instruct', dataset_path: '/etc/passwd' },
          400,
          'invalid_config',
          'dataset_path',
        ],
        [
          { base_model: 'smollm2-135m-instruct', dataset_path: 'missing.jsonl' },
          400,
          'invalid_config',
          'dataset_path',
        ],
        [
          { base_model: 'smollm2-135m-instruct', dataset_id: 'ds_missing', train_texts: ['a'] },
          400,
          'invalid_config',
          'train_texts',
        ],
        [
          { base_model: 'smollm2-135m-instruct', train_texts: ['a'], output_dir: '../..' },
          400,
          'invalid_config',
          'output_dir',
        ],
        [{ type: 'contract' }, 400, 'invalid_config', 'source_model_id'],
        [{ type: 'merge' }, 400, 'invalid_config', 'parent_job_id'],
        [{ base_model: 'smollm2-135m-instruct', dataset_id: 'ds_missing' }, 404, 'not_found', 'dataset_id'],
        [{ base_model: 'smollm2-135m-instruct', dataset_id: otherDatasetId }, 404, 'not_found', 'dataset_id'],
        [
          { type: 'finetune', source_model_id: 'model_missing', dataset_id: datasetId },
          404,
          'not_found',
          'source_model_id',
        ],
        [{ template: 'no-such-template', train_texts: ['a'] }, 404, 'not_found', 'template'],
        [{ type: 'merge', parent_job_id: 'job_missing' }, 404, 'job_not_found', 'parent_job_id'],
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
    });

    it('refuses a dataset_path that escapes through a symlink', async () => {
      const { symlink } = await import('node:fs/promises');
      await mkdir(join(server.dataDir, 'datasets'), { recursive: true });
      await symlink('/etc/hostname', join(server.dataDir, 'datasets', 'sneaky.jsonl')).catch(() => {});
      const res = await create({ base_model: 'smollm2-135m-instruct', dataset_path: 'sneaky.jsonl' });
      expect(res.status).toBe(400);
      expect((await res.json()).error.param).toBe('dataset_path');
    });

    it('refuses a merge of a job that is not a completed LoRA job', async () => {
      const pending = await createFinetune(server);
      const res = await create({ type: 'merge', parent_job_id: pending });
      expect(res.status).toBe(400);
      expect((await res.json()).error).toMatchObject({ code: 'invalid_config', param: 'parent_job_id' });
    });

    it('refuses a job over budget with 402 insufficient_credits', async () => {
      await server.ctx
        .knex('tenants')
        .insert({ id: 'poor', budget_limit_usd: 0.0001 })
        .onConflict('id')
        .merge();
      const { createKey } = await import('../src/auth.js');
      const key = await createKey(server.ctx.knex, { kind: 'user', tenantId: 'poor' });
      const res = await create(
        { base_model: 'llama-3.1-8b', train_texts: ['a'.repeat(1000)], max_steps: 100000, batch_size: 64 },
        { key },
      );
      expect(res.status).toBe(402);
      expect((await res.json()).error.code).toBe('insufficient_credits');
      expect(await server.ctx.knex('jobs').where({ tenant_id: 'poor' })).toEqual([]);
    });
  });

  describe('read', () => {
    it('lists newest first with status and type filters and pages', async () => {
      const ids = [await createFinetune(server), await createFinetune(server), await createFinetune(server)];
      const res = await server.api('/v1/training/jobs?limit=2&type=finetune&status=pending');
      expect(res.status).toBe(200);
      const page = await res.json();
      expect(page.jobs.map((j: { id: string }) => j.id)).toEqual([ids[2], ids[1]]);
      expect(page.has_more).toBe(true);
      expect(page.total).toBeGreaterThanOrEqual(3);
      const none = await (await server.api('/v1/training/jobs?type=contract')).json();
      expect(none).toEqual({ jobs: [], total: 0, has_more: false, next_cursor: null });
      expect((await server.api('/v1/training/jobs?status=done')).status).toBe(400);
      expect((await server.api('/v1/training/jobs?limit=101')).status).toBe(400);
    });

    it('answers GET with the job exactly as its whole row shows it', async () => {
      const id = await createFinetune(server);
      // Every kind of column the view reads holds a value: JSON, numeric, floats, timestamps, text.
      await server.ctx
        .knex('jobs')
        .where({ id })
        .update({
          status: 'failed',
          metrics: { loss: [1.5, 1.25] },
          current_step: 7,
          current_loss: 1.25,
          learning_rate: 0.0002,
          cost_accrued: '0.123456',
          adapter_name: 'held-out',
          error_code: 'worker_error',
          error_message: 'boom',
          // microseconds, which the view's JSON and a row's Date both cut to milliseconds
          started_at: server.ctx.knex.raw(`'2026-01-02 03:04:05.678999+00'::timestamptz`),
          finished_at: new Date('2026-01-02T04:04:05.678Z'),
        });
      const row = await server.ctx.knex('jobs').where({ id }).first();
      const res = await server.api(`/v1/training/jobs/${id}`);
      expect(res.status).toBe(200);
      expect(await res.json()).toEqual(serializeTrainingJob(row, server.ctx.storage));
    });

    it("hides another tenant's job everywhere with 404 job_not_found", async () => {
      const id = await createFinetune(server);
      const paths = [
        '',
        '/logs',
        '/metrics',
        '/events',
        '/result',
        '/output',
        '/output/a.bin',
        '/checkpoints',
      ];
      for (const path of paths) {
        const res = await server.api(`/v1/training/jobs/${id}${path}`, { key: server.otherKey });
        expect({ path, status: res.status, code: (await res.json()).error.code }).toEqual({
          path,
          status: 404,
          code: 'job_not_found',
        });
      }
      for (const path of ['/cancel', '/resume', '/merge']) {
        const res = await server.api(`/v1/training/jobs/${id}${path}`, {
          key: server.otherKey,
          method: 'POST',
          json: {},
        });
        expect({ path, status: res.status }).toEqual({ path, status: 404 });
      }
      const del = await server.api(`/v1/training/jobs/${id}`, { key: server.otherKey, method: 'DELETE' });
      expect(del.status).toBe(404);
      const theirs = await (await server.api('/v1/training/jobs', { key: server.otherKey })).json();
      expect(theirs.jobs.map((j: { id: string }) => j.id)).not.toContain(id);
    });

    it('answers 404 for an unknown job and 400 for a malformed id', async () => {
      const res = await server.api('/v1/training/jobs/job_nope');
      expect(res.status).toBe(404);
      expect((await res.json()).error).toMatchObject({ code: 'job_not_found', param: 'job_id' });
      expect((await server.api('/v1/training/jobs/bad%20id')).status).toBe(400);
    });

    it('answers result 404 until the job completes', async () => {
      const id = await createFinetune(server);
      const res = await server.api(`/v1/training/jobs/${id}/result`);
      expect(res.status).toBe(404);
      expect((await res.json()).error.code).toBe('not_found');
    });

    it('validates logs, metrics and events queries', async () => {
      const id = await createFinetune(server);
      for (const query of [
        'logs?tail=0',
        'logs?tail=1001',
        'logs?since=-1',
        'metrics?since_step=-2',
        'metrics?limit=0',
        'events?since=x',
      ]) {
        const res = await server.api(`/v1/training/jobs/${id}/${query}`);
        expect({ query, status: res.status }).toEqual({ query, status: 400 });
      }
      expect(await (await server.api(`/v1/training/jobs/${id}/logs`)).json()).toEqual({
        job_id: id,
        latest_seq: 0,
        lines: [],
      });
      expect(await (await server.api(`/v1/training/jobs/${id}/metrics`)).json()).toEqual({
        job_id: id,
        count: 0,
        latest_step: -1,
        points: [],
      });
      const events = await (await server.api(`/v1/training/jobs/${id}/events`)).json();
      expect(events.events.map((e: { kind: string }) => e.kind)).toEqual(['created']);
      expect(await (await server.api(`/v1/training/jobs/${id}/output`)).json()).toEqual({
        job_id: id,
        status: 'pending',
        files: [],
        total_files: 0,
        total_size_mb: 0,
      });
      expect(await (await server.api(`/v1/training/jobs/${id}/checkpoints`)).json()).toEqual({
        job_id: id,
        checkpoints: [],
      });
    });
  });

  describe('cancel, resume, merge', () => {
    it('cancels a pending job at once, then refuses with 409 job_already_finished; DELETE does the same', async () => {
      const id = await createFinetune(server);
      const res = await server.api(`/v1/training/jobs/${id}/cancel`, { method: 'POST' });
      expect(res.status).toBe(200);
      expect(await res.json()).toMatchObject({ id, status: 'cancelled', cancel_requested: true });
      const again = await server.api(`/v1/training/jobs/${id}/cancel`, { method: 'POST' });
      expect(again.status).toBe(409);
      expect((await again.json()).error.code).toBe('job_already_finished');
      const other = await createFinetune(server);
      const del = await server.api(`/v1/training/jobs/${other}`, { method: 'DELETE' });
      expect(await del.json()).toMatchObject({ status: 'cancelled' });
      expect((await server.api(`/v1/training/jobs/${other}`)).status).toBe(200);
    });

    it('resumes a cancelled job from the latest or a named checkpoint', async () => {
      await server.ctx.knex('jobs').whereIn('status', ['pending', 'running']).update({ status: 'cancelled' });
      const id = await createFinetune(server);
      const worker = fakeWorker(server);
      const claimed = (await worker.claim())!;
      expect(claimed.job_id).toBe(id);
      await worker.upload(id, claimed.lease_token, 'checkpoints', 'checkpoint-2', Buffer.from('two'), 2);
      await worker.upload(id, claimed.lease_token, 'checkpoints', 'checkpoint-4', Buffer.from('four'), 4);
      const running = await server.api(`/v1/training/jobs/${id}/resume`, { method: 'POST', json: {} });
      expect(running.status).toBe(409);
      expect((await running.json()).error.code).toBe('job_not_resumable');
      await server.api(`/v1/training/jobs/${id}/cancel`, { method: 'POST' });
      expect((await worker.cancelled(id, claimed.lease_token)).status).toBe(200);

      const unknown = await server.api(`/v1/training/jobs/${id}/resume`, {
        method: 'POST',
        json: { checkpoint: 'checkpoint-9' },
      });
      expect(unknown.status).toBe(404);
      expect((await unknown.json()).error.param).toBe('checkpoint');
      const bad = await server.api(`/v1/training/jobs/${id}/resume`, {
        method: 'POST',
        json: { checkpoint: '../x' },
      });
      expect(bad.status).toBe(400);

      const resumed = await server.api(`/v1/training/jobs/${id}/resume`, {
        method: 'POST',
        json: { checkpoint: 'checkpoint-2' },
      });
      expect(resumed.status).toBe(200);
      expect(await resumed.json()).toMatchObject({
        status: 'pending',
        phase: 'queued',
        cancel_requested: false,
      });
      const again = (await worker.claim())!;
      expect(again).toMatchObject({ job_id: id, attempt: 2 });
      expect(again.resume_from).toMatchObject({ name: 'checkpoint-2', step: 2 });
      const bytes = await worker.download(again.resume_from!.download_url, again.lease_token);
      expect(await bytes.text()).toBe('two');

      await worker.fail(id, again.lease_token, { code: 'training_error', message: 'x' }, false);
      const latest = await server.api(`/v1/training/jobs/${id}/resume`, { method: 'POST' });
      expect(latest.status).toBe(200);
      expect((await worker.claim())!.resume_from).toMatchObject({ name: 'checkpoint-4', step: 4 });
    });

    it('refuses to resume a job without checkpoints', async () => {
      const id = await createFinetune(server);
      await server.api(`/v1/training/jobs/${id}/cancel`, { method: 'POST' });
      const res = await server.api(`/v1/training/jobs/${id}/resume`, { method: 'POST' });
      expect(res.status).toBe(409);
      expect((await res.json()).error.code).toBe('job_not_resumable');
    });

    it('merges a completed LoRA job: a merge job whose worker gets the adapter files', async () => {
      await server.ctx.knex('jobs').whereIn('status', ['pending', 'running']).update({ status: 'cancelled' });
      const parent = await createFinetune(server, { output_name: 'merge-parent' });
      const worker = fakeWorker(server);
      const claimed = (await worker.claim())!;
      await worker.upload(
        parent,
        claimed.lease_token,
        'outputs',
        'adapter_model.safetensors',
        Buffer.from('weights'),
      );
      await worker.upload(parent, claimed.lease_token, 'outputs', 'adapter_config.json', Buffer.from('{}'));
      await worker.upload(parent, claimed.lease_token, 'outputs', 'model-q4_k_m.gguf', Buffer.from('gguf'));
      const early = await server.api(`/v1/training/jobs/${parent}/merge`, { method: 'POST' });
      expect(early.status).toBe(400);
      expect((await worker.complete(parent, claimed.lease_token, { loss_final: 1 })).status).toBe(200);

      const res = await server.api(`/v1/training/jobs/${parent}/merge`, {
        method: 'POST',
        json: { output_name: 'merged-model', export_gguf: true, idempotency_key: 'merge-1' },
      });
      expect(res.status).toBe(201);
      const body = await res.json();
      expect(body.job).toMatchObject({
        id: body.merge_job_id,
        type: 'merge',
        parent_job_id: parent,
        status: 'pending',
      });
      const repeat = await server.api(`/v1/training/jobs/${parent}/merge`, {
        method: 'POST',
        json: { output_name: 'merged-model', export_gguf: true, idempotency_key: 'merge-1' },
      });
      expect((await repeat.json()).merge_job_id).toBe(body.merge_job_id);
      const mergeClaim = (await worker.claim())!;
      expect(mergeClaim).toMatchObject({ job_id: body.merge_job_id, type: 'merge' });
      expect(mergeClaim.spec).toMatchObject({
        output_name: 'merged-model',
        export_gguf: true,
        quantization_types: ['q4_k_m'],
        base_model: { name: 'smollm2-135m-instruct', source: 'HuggingFaceTB/SmolLM2-135M-Instruct' },
      });
      expect(mergeClaim.inputs.map((i) => [i.role, i.name])).toEqual([
        ['adapter', 'adapter_config.json'],
        ['adapter', 'adapter_model.safetensors'],
      ]);
      const got = await server.api(`/v1/training/jobs/${body.merge_job_id}`);
      expect((await got.json()).type).toBe('merge');
    });
  });
});
