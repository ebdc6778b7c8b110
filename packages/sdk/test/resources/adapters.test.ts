import { describe, expect, it } from 'vitest';
import { BadRequestError, NotFoundError } from '../../src/index.js';
import { useMockServer } from '../helpers.js';

const { mock, client } = useMockServer();

describe('adapters', () => {
  it('list, retrieve, load, unload, delete', async () => {
    const tunery = client();
    const job = await tunery.training.jobs.create({
      base_model: 'tiny-llama',
      train_texts: ['a'],
      output_name: 'support-v1',
    });
    mock.advanceJob(job.id, 'completed');
    const page = await tunery.adapters.list();
    expect(page.data.map((a) => a.name)).toEqual(['support-v1']);
    expect(page.body.current_adapter).toBeNull();
    expect(await tunery.adapters.retrieve('support-v1')).toMatchObject({
      model_name: 'tiny-llama',
      job_id: job.id,
    });
    await expect(tunery.adapters.unload()).rejects.toMatchObject({ code: 'no_adapter_loaded' });
    expect(await tunery.adapters.load('support-v1')).toMatchObject({ status: 'loaded' });
    expect((await tunery.adapters.list()).body.current_adapter).toBe('support-v1');
    expect(await tunery.adapters.unload()).toMatchObject({ adapter_name: 'support-v1', status: 'unloaded' });
    expect(await tunery.adapters.delete('support-v1')).toMatchObject({ status: 'deleted' });
    await expect(tunery.adapters.get('support-v1')).rejects.toBeInstanceOf(NotFoundError);
    await expect(tunery.adapters.unload()).rejects.toBeInstanceOf(BadRequestError);
  });
});
