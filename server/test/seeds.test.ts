/**
 * Each seed's own request examples, sent as the seed writes them (body and path per
 * openapi/COVERAGE.md: `/v1` paths, snake_case for seed 004, Tunery ids where seed 002 has
 * `<uuid>` placeholders), asserting the effect the seed documents. Seed 000's examples are also
 * walked field by field in distillation.test.ts.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { storeDataset } from '../src/services/datasets.js';
import { createFinetune, fakeWorker } from './fake-worker.js';
import { recordSupportTrajectory } from './fixtures.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

describe.each(DATABASES)('seed request examples on %s', (db) => {
  let server: TestServer;
  let datasetId: string;
  let adapterModelId: string;
  let loraJobId: string;
  beforeAll(async () => {
    server = await startTestServer(db);
    // recorded traffic (seeds 000 and 004 build their data from trajectories)
    await recordSupportTrajectory(server);
    datasetId = (
      await storeDataset(server.ctx, 'default', {
        name: 'seed-data',
        records: [{ text: 'a b c' }, { text: 'd e f' }, { text: 'g h i' }],
        source: 'inline',
      })
    ).id;
    // a completed LoRA job and its adapter model (merge parent, source_model_id)
    loraJobId = await createFinetune(server, { output_name: 'seed-adapter' });
    const worker = fakeWorker(server, 'seed-worker');
    const claimed = (await worker.claim())!;
    for (const name of ['adapter_model.safetensors', 'adapter_config.json']) {
      await worker.upload(loraJobId, claimed.lease_token, 'outputs', name, Buffer.from('{}'));
    }
    expect((await worker.complete(loraJobId, claimed.lease_token, {})).status).toBe(200);
    adapterModelId = (await server.ctx.knex('jobs').where({ id: loraJobId }).first()).output_model_id;
    // seed 001 names a dataset file
    await mkdir(join(server.dataDir, 'datasets'), { recursive: true });
    await writeFile(
      join(server.dataDir, 'datasets', 'alpaca.jsonl'),
      `${JSON.stringify({ prompt: 'Say hi', completion: 'hi' })}\n${JSON.stringify({ prompt: 'Say bye', completion: 'bye' })}\n`,
    );
  });
  afterAll(async () => {
    await server?.stop();
  });

  const post = (path: string, json?: unknown) =>
    server.api(path, { method: 'POST', ...(json === undefined ? {} : { json }) });

  describe('seed 000 (distillation)', () => {
    it('creates the documented request: 201 pending with the documented fields', async () => {
      const res = await post('/v1/distillation', {
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
      });
      expect(res.status).toBe(201);
      expect(await res.json()).toMatchObject({
        id: expect.stringMatching(/^job_/),
        name: 'ticket-triage v1',
        tenant_id: 'default',
        status: 'pending',
        phase: 'initializing',
        progress: {},
        results: {},
        cost_accrued: 0,
        created_at: expect.any(String),
        updated_at: expect.any(String),
      });
    });

    it('creates the curl example, then lists, gets and cancels it', async () => {
      const res = await post('/v1/distillation', {
        name: 'demo',
        config: {
          teacher_model: 'openai/gpt-4o-mini',
          student_model: 'llama-3.2-1b',
          num_prompts: 50,
          training_steps: 30,
        },
      });
      expect(res.status).toBe(201);
      const { id } = await res.json();
      const list = await (await server.api('/v1/distillation?tenant_id=default&limit=20')).json();
      expect(list.jobs.map((j: { id: string }) => j.id)).toContain(id);
      expect((await (await server.api(`/v1/distillation/${id}?tenant_id=default`)).json()).id).toBe(id);
      const cancelled = await post(`/v1/distillation/${id}/cancel`);
      expect(cancelled.status).toBe(200);
      expect((await cancelled.json()).status).toBe('cancelled');
    });
  });

  describe('seed 001 (training jobs)', () => {
    it('submits the documented job: the full job with job_id, status and config', async () => {
      const res = await post('/v1/training/jobs', {
        base_model: 'Qwen/Qwen2.5-7B-Instruct',
        dataset_path: 'alpaca.jsonl',
        method: 'lora',
        num_epochs: 3,
        batch_size: 4,
        lora_rank: 16,
        eval_split: 0.1,
      });
      expect(res.status).toBe(201);
      const job = await res.json();
      expect(job).toMatchObject({ job_id: job.id, status: 'pending', method: 'lora' });
      expect(job.config).toMatchObject({
        method: 'lora',
        lora: { r: 16 },
        training: { num_epochs: 3, batch_size: 4, eval_split: 0.1 },
      });
    });

    it('takes every training config field; the hub dataset id placeholder is 400 naming dataset_path', async () => {
      const fields = {
        base_model: 'Qwen/Qwen2.5-7B-Instruct',
        dataset_path: 'path/or/hf-dataset-id',
        method: 'lora',
        num_epochs: 3,
        batch_size: 4,
        learning_rate: 0.0002,
        lora_rank: 16,
        lora_alpha: 32,
        max_seq_length: 2048,
        eval_split: 0.1,
        eval_steps: 0,
        use_gradient_checkpointing: false,
        distributed: false,
        num_nodes: 1,
        hf_token: 'hf_xxx',
        wandb_project: 'my-project',
        run_name: 'alpaca-7b-run1',
      };
      const asWritten = await post('/v1/training/jobs', fields);
      expect(asWritten.status).toBe(400);
      expect((await asWritten.json()).error).toMatchObject({ code: 'invalid_config', param: 'dataset_path' });
      const res = await post('/v1/training/jobs', { ...fields, dataset_path: 'alpaca.jsonl' });
      expect(res.status).toBe(201);
      const job = await res.json();
      expect(job).toMatchObject({ run_name: 'alpaca-7b-run1', status: 'pending' });
      expect(job.config).toMatchObject({
        wandb_project: 'my-project',
        lora: { r: 16, alpha: 32 },
        training: { learning_rate: 0.0002, max_seq_length: 2048, eval_split: 0.1, eval_steps: 0 },
        distributed: { enabled: false, num_nodes: 1 },
      });
      expect(JSON.stringify(job)).not.toContain('hf_xxx');
    });

    it('lists output, merges (no body) and gets the merge job', async () => {
      const output = await (await server.api(`/v1/training/jobs/${loraJobId}/output`)).json();
      expect(output).toMatchObject({ job_id: loraJobId, status: 'completed', total_files: 2 });
      expect(output.files[0]).toMatchObject({ name: expect.any(String), size_mb: expect.any(Number) });
      const merge = await post(`/v1/training/jobs/${loraJobId}/merge`);
      expect(merge.status).toBe(201);
      const { merge_job_id } = await merge.json();
      const got = await (await server.api(`/v1/training/jobs/${merge_job_id}`)).json();
      expect(got).toMatchObject({ id: merge_job_id, type: 'merge', parent_job_id: loraJobId });
    });
  });

  describe('seed 002 (jobs & runs)', () => {
    it('submits the training run: 201 with the documented job object', async () => {
      const res = await post('/v1/training/jobs', {
        type: 'train',
        idempotency_key: 'run-1',
        base_model_id: 'bm_smollm2-135m-instruct',
        dataset_id: datasetId,
        hyperparams: { turns: 2, output_name: 'my-model' },
      });
      expect(res.status).toBe(201);
      expect(await res.json()).toMatchObject({
        id: expect.any(String),
        type: 'train',
        status: 'pending',
        retries: 0,
        last_checkpoint_step: 0,
        output_model_id: null,
        created_at: expect.any(String),
        started_at: null,
        finished_at: null,
      });
    });

    it('submits the fine-tune run with source_model_id and hyperparams', async () => {
      const res = await post('/v1/training/jobs', {
        type: 'finetune',
        idempotency_key: 'ft-1',
        source_model_id: adapterModelId,
        dataset_id: datasetId,
        hyperparams: { lora_rank: 32, steps: 2000, output_name: 'my-model' },
      });
      expect(res.status).toBe(201);
      const job = await res.json();
      expect(job).toMatchObject({ type: 'finetune', status: 'pending', total_steps: 2000 });
      expect(job.config).toMatchObject({
        lora: { r: 32 },
        training: { max_steps: 2000 },
        output_name: 'my-model',
      });
    });

    it('submits the contraction run with no dataset', async () => {
      const res = await post('/v1/training/jobs', {
        type: 'contract',
        idempotency_key: 'contract-1',
        hyperparams: { source_model_id: adapterModelId, contraction_ratio: 0.5, num_layers_to_contract: 8 },
      });
      expect(res.status).toBe(201);
      const job = await res.json();
      expect(job).toMatchObject({ type: 'contract', status: 'pending', dataset_id: null });
      expect(job.config).toMatchObject({ contraction_ratio: 0.5, num_layers_to_contract: 8 });
    });

    it('recommends a config with the documented fields', async () => {
      const res = await post('/v1/training/recommend', {
        base_model_id: 'bm_smollm2-135m-instruct',
        dataset_id: datasetId,
      });
      expect(res.status).toBe(200);
      const body = await res.json();
      expect(body).toMatchObject({
        model_params: 134_515_008,
        dataset_tokens_est: expect.any(Number),
        recommended: {
          turns: expect.any(Number),
          lr: expect.any(Number),
          cycles: expect.any(Number),
          steps_per_cycle: expect.any(Number),
          seq_len: expect.any(Number),
        },
        windows: { lr: { min: expect.any(Number), max: expect.any(Number) } },
        notes: expect.any(Array),
        disclaimer: expect.any(String),
      });
    });
  });

  describe('seed 003 (QLoRA training API)', () => {
    it('starts the documented training job: 201 with the job', async () => {
      const res = await post('/v1/training/jobs', {
        model_name: 'codellama-7b-instruct',
        train_texts: ['### Instruction:\nWrite a Python function\n\n### Response:\ndef example():\n    pass'],
        lora_config: { r: 4, lora_alpha: 8, lora_dropout: 0.05, target_modules: ['q_proj', 'v_proj'] },
        training_config: {
          num_epochs: 3,
          batch_size: 1,
          learning_rate: 2e-4,
          max_steps: -1,
          gradient_accumulation_steps: 4,
          warmup_steps: 100,
          logging_steps: 10,
          save_steps: 500,
        },
        output_dir: './custom_output',
      });
      expect(res.status).toBe(201);
      const job = await res.json();
      expect(job).toMatchObject({
        job_id: job.id,
        status: 'pending',
        model_name: 'codellama-7b-instruct',
        progress: 0,
        current_step: 0,
        error_message: null,
      });
      expect(job.config).toMatchObject({
        output_name: 'custom_output',
        lora: { r: 4, alpha: 8, dropout: 0.05, target_modules: ['q_proj', 'v_proj'] },
        training: { gradient_accumulation_steps: 4, warmup_steps: 100, save_steps: 500 },
      });
    });

    it('uploads the documented texts: 201 with num_texts and status uploaded', async () => {
      const res = await post('/v1/datasets', {
        dataset_name: 'my_dataset',
        train_texts: [
          '### Instruction:\nExample instruction\n\n### Response:\nExample response',
          '### Instruction:\nAnother instruction\n\n### Response:\nAnother response',
        ],
      });
      expect(res.status).toBe(201);
      expect(await res.json()).toMatchObject({
        dataset_name: 'my_dataset',
        num_texts: 2,
        status: 'uploaded',
      });
    });

    it('answers unload with nothing loaded as 400 no_adapter_loaded', async () => {
      const res = await post('/v1/adapters/unload');
      expect(res.status).toBe(400);
      expect((await res.json()).error.code).toBe('no_adapter_loaded');
    });
  });

  describe('seed 004 (trajectory training)', () => {
    it('builds the documented dataset: 201 with the dataset', async () => {
      const res = await post('/v1/datasets/build', { limit: 100, min_llm_calls_per_trajectory: 2 });
      expect(res.status).toBe(201);
      // returned bare (COVERAGE.md: single objects are not wrapped); exampleCount is num_examples
      expect(await res.json()).toMatchObject({
        id: expect.any(String),
        source: 'trajectories',
        trajectory_count: 1,
        num_examples: 2,
      });
    });

    it('answers the documented mlx job 400 backend_unavailable while no mlx worker is online', async () => {
      const res = await post('/v1/training/jobs', {
        dataset_id: datasetId,
        backend: 'mlx',
        base_model: 'eliza-1-2b',
        max_steps: 100,
        batch_size: 4,
        learning_rate: 1e-5,
      });
      expect(res.status).toBe(400);
      expect((await res.json()).error).toMatchObject({ code: 'backend_unavailable', param: 'backend' });
    });

    it('updates the auto config as documented: ok and the config', async () => {
      const res = await server.api('/v1/training/auto/config', {
        method: 'PUT',
        json: { threshold: 200, cooldown_hours: 24 },
      });
      expect(res.status).toBe(200);
      expect(await res.json()).toMatchObject({ ok: true, config: { threshold: 200, cooldown_hours: 24 } });
    });

    it('activates the documented model: ok and the active model', async () => {
      const res = await post(`/v1/models/${adapterModelId}/activate`, { provider_model: 'eliza-v1' });
      expect(res.status).toBe(200);
      expect(await res.json()).toMatchObject({ ok: true, active_model: 'eliza-v1' });
    });

    it('benchmarks the model (no body, as written): a queued job on the data it was trained on', async () => {
      const res = await post(`/v1/models/${adapterModelId}/benchmark`);
      expect(res.status).toBe(202);
      const queued = await res.json();
      expect(queued).toMatchObject({ model_id: adapterModelId, status: 'pending', scores: null });
      expect(await server.ctx.knex('jobs').where({ id: queued.job_id }).first()).toMatchObject({
        type: 'benchmark',
        model_id: adapterModelId,
      });
    });

    it('answers import-ollama with baseModel, as the seed writes it, 400 naming base_model', async () => {
      const res = await post(`/v1/models/${adapterModelId}/import-ollama`, {
        model_name: 'eliza-v1',
        base_model: 'eliza-1-2b',
        ollama_url: 'http://localhost:11434',
      });
      expect(res.status).toBe(400);
      expect((await res.json()).error).toMatchObject({ param: 'base_model' });
    });

    it('answers the status counters', async () => {
      const res = await server.api('/v1/training/status');
      expect(res.status).toBe(200);
      expect(await res.json()).toMatchObject({
        running_jobs: expect.any(Number),
        queued_jobs: expect.any(Number),
        model_count: expect.any(Number),
        dataset_count: expect.any(Number),
        runtime_available: expect.any(Boolean),
      });
    });
  });
});
