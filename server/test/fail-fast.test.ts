/**
 * Issue 11: no request field accepted and ignored, and every check that can be made at submission
 * answered 400 at create time rather than by a failed job later.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { storeDataset } from '../src/services/datasets.js';
import { createFinetune, fakeWorker } from './fake-worker.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

describe.each(DATABASES)('fail fast on %s', (db) => {
  let server: TestServer;
  let datasetId: string;
  let oneExample: string;
  let parentJob: string;
  let adapterModel: string;
  beforeAll(async () => {
    server = await startTestServer(db);
    const store = (name: string, records: object[]) =>
      storeDataset(server.ctx, 'default', { name, records, source: 'inline' }).then((d) => d.id);
    datasetId = await store('three', [{ text: 'a' }, { text: 'b' }, { text: 'c' }]);
    oneExample = await store('one', [{ text: 'only' }]);
    // a completed LoRA job (parent of merges) and its adapter model (input of benchmarks)
    parentJob = await createFinetune(server, { output_name: 'ff-parent' });
    const worker = fakeWorker(server, 'ff-worker');
    const claimed = (await worker.claim())!;
    const upload = (name: string) =>
      worker.upload(parentJob, claimed.lease_token, 'outputs', name, Buffer.from('{}'));
    await upload('adapter_model.safetensors');
    await upload('adapter_config.json');
    expect((await worker.complete(parentJob, claimed.lease_token, {})).status).toBe(200);
    adapterModel = (await server.ctx.knex('jobs').where({ id: parentJob }).first()).output_model_id;
    expect(adapterModel).toBeTruthy();
  });
  afterAll(async () => {
    await server?.stop();
  });

  const create = (json: Record<string, unknown>) => server.api('/v1/training/jobs', { method: 'POST', json });
  const expectRefused = async (json: Record<string, unknown>, code: string, param: string) => {
    const res = await create(json);
    const body = await res.json();
    expect({ json, status: res.status, code: body.error?.code, param: body.error?.param }).toEqual({
      json,
      status: 400,
      code,
      param,
    });
    expect(body.error.message).toEqual(expect.any(String));
  };
  const jobCount = async () => Number((await server.ctx.knex('jobs').count({ n: '*' }))[0]!.n);

  describe('fields a job type does not use are refused, not stored and ignored', () => {
    const model = { base_model: 'smollm2-135m-instruct' };
    const cases: [string, () => Record<string, unknown>, string][] = [
      [
        'merge + lora_config',
        () => ({ type: 'merge', parent_job_id: parentJob, lora_config: { r: 4 } }),
        'lora_config',
      ],
      [
        'merge + training_config',
        () => ({ type: 'merge', parent_job_id: parentJob, training_config: { max_steps: 3 } }),
        'training_config.max_steps',
      ],
      [
        'merge + training_config.seed',
        () => ({ type: 'merge', parent_job_id: parentJob, training_config: { seed: 7 } }),
        'training_config.seed',
      ],
      [
        'full finetune + lora_rank',
        () => ({ ...model, dataset_id: datasetId, method: 'full', lora_rank: 8 }),
        'lora_rank',
      ],
      [
        'full finetune + hyperparams.lora_rank',
        () => ({ ...model, dataset_id: datasetId, method: 'full', hyperparams: { lora_rank: 8 } }),
        'hyperparams.lora_rank',
      ],
      [
        'full finetune + a template with LoRA presets',
        () => ({ ...model, dataset_id: datasetId, method: 'full', template: 'lora-default' }),
        'template',
      ],
      [
        'qlora finetune from an adapter model',
        () => ({ source_model_id: adapterModel, dataset_id: datasetId, method: 'qlora' }),
        'method',
      ],
      [
        'LoRA bias on a fine-tune from an adapter model',
        () => ({ source_model_id: adapterModel, dataset_id: datasetId, lora_config: { bias: 'all' } }),
        'lora_config.bias',
      ],
      [
        'merge + eval_split',
        () => ({ type: 'merge', parent_job_id: parentJob, eval_split: 0.1 }),
        'eval_split',
      ],
      ['merge + base_model', () => ({ type: 'merge', parent_job_id: parentJob, ...model }), 'base_model'],
      [
        'merge + dataset_id',
        () => ({ type: 'merge', parent_job_id: parentJob, dataset_id: datasetId }),
        'dataset_id',
      ],
      ['merge + method', () => ({ type: 'merge', parent_job_id: parentJob, method: 'lora' }), 'method'],
      [
        'merge + distributed',
        () => ({ type: 'merge', parent_job_id: parentJob, distributed: true }),
        'distributed',
      ],
      [
        'merge + hyperparams.lr',
        () => ({ type: 'merge', parent_job_id: parentJob, hyperparams: { lr: 0.1 } }),
        'hyperparams.lr',
      ],
      ['contract + eval_split', () => ({ type: 'contract', ...model, eval_split: 0.1 }), 'eval_split'],
      [
        'contract + lora_config',
        () => ({ type: 'contract', ...model, lora_config: { r: 4 } }),
        'lora_config',
      ],
      ['contract + method', () => ({ type: 'contract', ...model, method: 'qlora' }), 'method'],
      [
        'contract + learning_rate',
        () => ({ type: 'contract', ...model, learning_rate: 0.1 }),
        'learning_rate',
      ],
      [
        'contract + hyperparams.turns',
        () => ({ type: 'contract', ...model, hyperparams: { turns: 2 } }),
        'hyperparams.turns',
      ],
      [
        'contract + parent_job_id',
        () => ({ type: 'contract', ...model, parent_job_id: parentJob }),
        'parent_job_id',
      ],
      [
        'train + training_config.batch_size',
        () => ({ type: 'train', ...model, dataset_id: datasetId, training_config: { batch_size: 2 } }),
        'training_config.batch_size',
      ],
      [
        'train + wrong hyperparams',
        () => ({ type: 'train', ...model, dataset_id: datasetId, hyperparams: { contraction_ratio: 0.5 } }),
        'hyperparams.contraction_ratio',
      ],
      [
        'train + distributed',
        () => ({ type: 'train', ...model, dataset_id: datasetId, distributed: true }),
        'distributed',
      ],
      [
        'train + max_steps',
        () => ({ type: 'train', ...model, dataset_id: datasetId, max_steps: 5 }),
        'max_steps',
      ],
      [
        'benchmark + output_name',
        () => ({ type: 'benchmark', source_model_id: adapterModel, dataset_id: datasetId, output_name: 'x' }),
        'output_name',
      ],
      [
        'benchmark + wandb-free lora_rank',
        () => ({ type: 'benchmark', source_model_id: adapterModel, dataset_id: datasetId, lora_rank: 4 }),
        'lora_rank',
      ],
      [
        'benchmark + hyperparams.seq_len',
        () => ({
          type: 'benchmark',
          source_model_id: adapterModel,
          dataset_id: datasetId,
          hyperparams: { seq_len: 64 },
        }),
        'hyperparams.seq_len',
      ],
      [
        'finetune + parent_job_id',
        () => ({ ...model, dataset_id: datasetId, parent_job_id: parentJob }),
        'parent_job_id',
      ],
      [
        'finetune + hyperparams.turns',
        () => ({ ...model, dataset_id: datasetId, hyperparams: { turns: 2 } }),
        'hyperparams.turns',
      ],
      [
        'model named twice',
        () => ({ ...model, base_model_id: 'bm_smollm2-135m-instruct', dataset_id: datasetId }),
        'base_model_id',
      ],
      [
        'model and source model',
        () => ({ ...model, source_model_id: adapterModel, dataset_id: datasetId }),
        'source_model_id',
      ],
      [
        'model_name beside base_model',
        () => ({ ...model, model_name: 'qwen2.5-0.5b-instruct', dataset_id: datasetId }),
        'model_name',
      ],
      [
        'output named twice',
        () => ({ ...model, dataset_id: datasetId, output_name: 'a', hyperparams: { output_name: 'b' } }),
        'hyperparams.output_name',
      ],
      [
        'output_dir beside output_name',
        () => ({ ...model, dataset_id: datasetId, output_name: 'a', output_dir: './b' }),
        'output_dir',
      ],
    ];
    it.each(cases)('%s', async (_name, body, param) => {
      const before = await jobCount();
      await expectRefused(body(), 'invalid_config', param);
      expect(await jobCount()).toBe(before);
    });

    it('still takes what each type uses', async () => {
      const ok = async (json: Record<string, unknown>) => {
        const res = await create(json);
        expect(res.status, JSON.stringify(await res.clone().json())).toBe(201);
        return res.json();
      };
      const merge = await ok({
        type: 'merge',
        parent_job_id: parentJob,
        output_name: 'merged',
        wandb_project: 'p',
      });
      expect(merge.config).toMatchObject({ output_name: 'merged', wandb_project: 'p' });
      const contract = await ok({
        type: 'contract',
        training_config: { seed: 7 },
        hyperparams: { source_model_id: adapterModel, contraction_ratio: 0.5, num_layers_to_contract: 8 },
      });
      expect(contract.config).toMatchObject({ contraction_ratio: 0.5, num_layers_to_contract: 8, seed: 7 });
      const full = await ok({ ...model, dataset_id: datasetId, method: 'full', template: 'full-small' });
      expect(full).toMatchObject({ method: 'full' });
      // a template's seed reaches the spec of a type that reads it (the request's wins over it)
      const template = await server.api('/v1/training/templates', {
        method: 'POST',
        json: { name: 'ff-seeded-contract', config: { type: 'contract', training_config: { seed: 11 } } },
      });
      expect(template.status, await template.clone().text()).toBe(201);
      const hyperparams = {
        source_model_id: adapterModel,
        contraction_ratio: 0.5,
        num_layers_to_contract: 8,
      };
      const seeded = await ok({ template: 'ff-seeded-contract', hyperparams });
      expect(seeded.config).toMatchObject({ seed: 11 });
      const chosen = await ok({ template: 'ff-seeded-contract', training_config: { seed: 3 }, hyperparams });
      expect(chosen.config).toMatchObject({ seed: 3 });
      await ok({ type: 'benchmark', source_model_id: adapterModel, dataset_id: datasetId });
      await ok({
        type: 'train',
        base_model: 'smollm2-135m-instruct',
        dataset_id: datasetId,
        hyperparams: { lr: 0.001, seq_len: 64 },
      });
    });
  });

  describe('checks made at submission', () => {
    it('refuses a contraction that would remove every layer of a catalog model', async () => {
      // qwen2.5-0.5b-instruct has 24 layers: round(1 × 24) = 24 would leave none
      await expectRefused(
        {
          type: 'contract',
          base_model: 'qwen2.5-0.5b-instruct',
          hyperparams: { contraction_ratio: 1, num_layers_to_contract: 24 },
        },
        'invalid_config',
        'hyperparams.num_layers_to_contract',
      );
      // an adapter model counts its base's layers (smollm2-135m: 30)
      await expectRefused(
        {
          type: 'contract',
          source_model_id: adapterModel,
          hyperparams: { contraction_ratio: 1, num_layers_to_contract: 30 },
        },
        'invalid_config',
        'hyperparams.num_layers_to_contract',
      );
      const fits = await create({
        type: 'contract',
        base_model: 'qwen2.5-0.5b-instruct',
        hyperparams: { contraction_ratio: 1, num_layers_to_contract: 23 },
      });
      expect(fits.status).toBe(201);
      // a ratio of 0 removes nothing the worker accepts: refused by the schema
      await expectRefused(
        { type: 'contract', base_model: 'qwen2.5-0.5b-instruct', hyperparams: { contraction_ratio: 0 } },
        'invalid_request',
        'hyperparams.contraction_ratio',
      );
    });

    it('refuses qlora while no online CUDA worker runs it, and with a non-CUDA backend', async () => {
      const qlora = { base_model: 'smollm2-135m-instruct', dataset_id: datasetId, method: 'qlora' };
      await expectRefused(qlora, 'backend_unavailable', 'method');
      const workers = server.ctx.knex('workers');
      const add = (id: string, capabilities: object, stale = false) =>
        workers.clone().insert({
          id,
          capabilities: JSON.stringify(capabilities),
          last_seen_at: stale ? server.ctx.knex.raw("now() - interval '1 hour'") : server.ctx.knex.fn.now(),
        });
      // none of these can take it: a CPU worker, a CUDA worker without qlora, a stale CUDA worker
      await add('ff-cpu', { job_types: ['finetune'], device: 'cpu' });
      await add('ff-cuda-lora', { job_types: ['finetune'], methods: ['lora'], device: 'cuda' });
      await add('ff-cuda-stale', { job_types: ['finetune'], device: 'cuda' }, true);
      await add('ff-cuda-merge', { job_types: ['merge'], device: 'cuda' });
      await expectRefused(qlora, 'backend_unavailable', 'method');
      await add('ff-cuda', { job_types: ['finetune'], methods: ['lora', 'qlora'], device: 'cuda' });
      const accepted = await create(qlora);
      expect(accepted.status).toBe(201);
      await expectRefused({ ...qlora, backend: 'cpu' }, 'invalid_config', 'method');
      await workers.clone().whereLike('id', 'ff-%').delete();
    });

    it('refuses eval_split on fewer than 2 examples, and eval_steps with nothing held out', async () => {
      const base = { base_model: 'smollm2-135m-instruct' };
      await expectRefused(
        { ...base, dataset_id: oneExample, eval_split: 0.2 },
        'invalid_config',
        'eval_split',
      );
      await expectRefused(
        { ...base, train_texts: ['one'], training_config: { eval_split: 0.2 } },
        'invalid_config',
        'training_config.eval_split',
      );
      await expectRefused({ ...base, dataset_id: datasetId, eval_steps: 5 }, 'invalid_config', 'eval_steps');
      const ok = await create({ ...base, dataset_id: datasetId, eval_split: 0.34, eval_steps: 5 });
      expect(ok.status).toBe(201);
      expect((await ok.json()).config.training).toMatchObject({ eval_split: 0.34, eval_steps: 5 });
    });

    it('takes eval_dataset_id instead of a held-out split, not beside one, and only where it is used', async () => {
      const base = { base_model: 'smollm2-135m-instruct', dataset_id: datasetId };
      await expectRefused(
        { ...base, eval_dataset_id: oneExample, eval_split: 0.2 },
        'invalid_config',
        'eval_dataset_id',
      );
      await expectRefused(
        { ...base, type: 'contract', eval_dataset_id: oneExample },
        'invalid_config',
        'eval_dataset_id',
      );
      const missing = await create({ ...base, eval_dataset_id: 'ds_nope' });
      expect(missing.status).toBe(404);
      expect((await missing.json()).error.param).toBe('eval_dataset_id');
      const ok = await create({ ...base, eval_dataset_id: oneExample, eval_steps: 5 });
      expect(ok.status).toBe(201);
      expect((await ok.json()).config).toMatchObject({
        eval_dataset_id: oneExample,
        training: { eval_steps: 5 },
      });
    });

    it('refuses one setting written twice with different values, and takes equal ones', async () => {
      const base = { base_model: 'smollm2-135m-instruct', dataset_id: datasetId };
      await expectRefused(
        { ...base, max_steps: 10, training_config: { max_steps: 20 } },
        'invalid_config',
        'training_config.max_steps',
      );
      await expectRefused(
        { ...base, lora_rank: 8, hyperparams: { lora_rank: 16 } },
        'invalid_config',
        'hyperparams.lora_rank',
      );
      await expectRefused(
        { ...base, hyperparams: { seq_len: 256 }, training_config: { max_seq_length: 512 } },
        'invalid_config',
        'training_config.max_seq_length',
      );
      const same = await create({ ...base, learning_rate: 1e-4, hyperparams: { lr: 1e-4 }, lora_rank: 4 });
      expect(same.status).toBe(201);
      expect((await same.json()).config).toMatchObject({
        training: { learning_rate: 1e-4 },
        lora: { r: 4 },
      });
    });

    it('refuses a template whose presets the job type would ignore, and takes one made for it', async () => {
      const contract = { type: 'contract', base_model: 'smollm2-135m-instruct', dataset_id: datasetId };
      await expectRefused({ ...contract, template: 'lora-default' }, 'invalid_config', 'template');
      const refused = await create({ ...contract, template: 'lora-default' });
      expect((await refused.json()).error.message).toMatch(/^Template "lora-default" presets \w+/);
      const ok = await create({ ...contract, template: 'contract-half' });
      expect(ok.status).toBe(201);
      expect((await ok.json()).config).toMatchObject({ contraction_ratio: 0.5, num_layers_to_contract: 8 });
    });

    it("refuses a max_seq_length past the model's context; lowers a template's or the default", async () => {
      const shortModel = await server.api('/v1/base-models', {
        method: 'POST',
        json: { name: 'ff-short', source: 'org/ff-short', context_length: 512 },
      });
      expect(shortModel.status).toBe(201);
      const base = { base_model: 'ff-short', dataset_id: datasetId };
      await expectRefused({ ...base, max_seq_length: 1024 }, 'invalid_config', 'max_seq_length');
      await expectRefused(
        { ...base, hyperparams: { seq_len: 600 } },
        'invalid_config',
        'hyperparams.seq_len',
      );
      const fitted = await create(base);
      expect(fitted.status).toBe(201);
      expect((await fitted.json()).config.training.max_seq_length).toBe(512);
      const explicit = await create({ ...base, training_config: { max_seq_length: 256 } });
      expect((await explicit.json()).config.training.max_seq_length).toBe(256);
    });

    it('refuses merge options the worker would refuse or skip', async () => {
      const merge = (json: Record<string, unknown>) =>
        server.api(`/v1/training/jobs/${parentJob}/merge`, { method: 'POST', json });
      const refused = async (json: Record<string, unknown>, param: string) => {
        const res = await merge(json);
        expect(res.status).toBe(400);
        expect((await res.json()).error).toMatchObject({ code: 'invalid_config', param });
      };
      await refused({ quantization_types: ['q8_0'] }, 'quantization_types');
      await refused({ export_gguf: false, quantization_types: ['q8_0'] }, 'quantization_types');
      await refused({ export_gguf: true, quantization_types: [] }, 'quantization_types');
      const ok = await merge({ export_gguf: true, quantization_types: ['q8_0'] });
      expect(ok.status).toBe(201);
    });

    it('refuses GGUF export of a base model whose architecture the exporter does not write', async () => {
      const parent = await createFinetune(server, {
        base_model: 'gemma-2-2b-it',
        output_name: 'gemma-parent',
      });
      // its run's outcome does not matter here: only that it completed
      await server.ctx.knex('jobs').where({ id: parent }).update({ status: 'completed' });
      const res = await server.api(`/v1/training/jobs/${parent}/merge`, {
        method: 'POST',
        json: { export_gguf: true },
      });
      expect(res.status).toBe(400);
      expect((await res.json()).error).toMatchObject({ code: 'invalid_config', param: 'export_gguf' });
      const plain = await server.api(`/v1/training/jobs/${parent}/merge`, { method: 'POST', json: {} });
      expect(plain.status).toBe(201);
    });
  });
});
