import { describe, expect, it } from 'vitest';
import { ConflictError, type Model } from '../../src/index.js';
import { useMockServer } from '../helpers.js';

const { mock, client } = useMockServer();

describe('models', () => {
  it('list, retrieve, activate, import into Ollama, benchmark', async () => {
    const tunery = client();
    const job = await tunery.training.jobs.create({ base_model: 'tiny-llama', train_texts: ['a'] });
    mock.advanceJob(job.id, 'completed');
    const models: Model[] = [];
    for await (const m of tunery.models.list()) models.push(m);
    const [adapterModel] = models;
    expect(adapterModel).toMatchObject({ kind: 'adapter', job_id: job.id, active: false });
    expect(await tunery.models.retrieve(adapterModel!.id)).toEqual(adapterModel);

    const activated = await tunery.models.activate(adapterModel!.id, { provider_model: 'support:latest' });
    expect(activated).toMatchObject({ ok: true, active_model: 'support:latest', model: { active: true } });

    await expect(tunery.models.importOllama(adapterModel!.id)).rejects.toBeInstanceOf(ConflictError);
    const { merge_job_id } = await tunery.training.jobs.merge(job.id, { export_gguf: true });
    mock.advanceJob(merge_job_id, 'completed');
    const merged = (await tunery.training.jobs.retrieve(merge_job_id)).output_model_id!;
    await expect(
      tunery.models.importOllama(merged, { ollama_url: 'http://10.0.0.5:11434' }),
    ).rejects.toMatchObject({
      status: 400,
      param: 'ollama_url',
    });
    await expect(tunery.models.importOllama(merged, { base_model: 'llama3' })).rejects.toMatchObject({
      status: 400,
      param: 'base_model',
    });
    const imported = await tunery.models.importOllama(merged, { model_name: 'support-merged' });
    expect(imported.model).toMatchObject({ id: merged, ollama_name: 'tunery-default/support-merged' });
    mock.state.ollamaReachable = false;
    await expect(tunery.models.importOllama(merged)).rejects.toMatchObject({
      status: 502,
      code: 'ollama_unreachable',
    });

    const queued = await tunery.models.benchmark(merged, { max_examples: 5 });
    expect(queued).toMatchObject({ model_id: merged, status: 'pending', scores: null });
    mock.advanceJob(queued.job_id, 'completed');
    expect((await tunery.models.get(merged)).benchmark).toMatchObject({ scores: { perplexity: 12.5 } });
  });

  it('base models: list the catalog and register one', async () => {
    const tunery = client();
    expect((await tunery.baseModels.list()).data.map((m) => m.name)).toEqual(['tiny-llama']);
    const created = await tunery.baseModels.create({
      name: 'qwen-0.5b',
      source: 'Qwen/Qwen2.5-0.5B',
      params: 494_000_000,
    });
    expect(created).toMatchObject({ builtin: false, architecture: null });
    await expect(tunery.baseModels.create({ name: 'qwen-0.5b', source: 'x' })).rejects.toBeInstanceOf(
      ConflictError,
    );
    const job = await tunery.training.jobs.create({ base_model_id: created.id, train_texts: ['a'] });
    expect(job.base_model).toBe('qwen-0.5b');
  });
});
