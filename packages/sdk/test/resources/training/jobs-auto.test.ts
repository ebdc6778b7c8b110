import { describe, expect, it } from 'vitest';
import { useMockServer } from '../../helpers.js';

// With autoAdvance every poll moves the job one tick, as a worker would between polls.
const auto = useMockServer({ autoAdvance: true });
const finetune = { base_model: 'tiny-llama', train_texts: ['### Instruction:\nSay hi\n\n### Response:\nhi'] };
const fast = { pollIntervalMs: 1 };

describe('with autoAdvance', () => {
  it('createAndWait runs a job to its outputs, result, adapter and model', async () => {
    const jobs = auto.client().training.jobs;
    const done = await jobs.createAndWait({ ...finetune, output_name: 'hi-adapter' }, fast);
    expect(done).toMatchObject({
      status: 'completed',
      phase: 'done',
      progress: 100,
      adapter_name: 'hi-adapter',
    });
    const result = await jobs.result(done.id);
    expect(result).toMatchObject({ job_id: done.id, loss_final: done.current_loss });
    const outputs = await jobs.outputs(done.id);
    expect(outputs.files.map((f) => f.name)).toEqual([
      'adapter_model.safetensors',
      'adapter_config.json',
      'training_config.json',
    ]);
    expect((await jobs.checkpoints(done.id)).checkpoints.map((c) => c.step)).toEqual([20, 40]);
    const events = (await jobs.events(done.id)).events.map((e) => e.kind);
    expect(events[0]).toBe('created');
    expect(events.at(-1)).toBe('completed');
    const model = await auto.client().models.retrieve(done.output_model_id!);
    expect(model).toMatchObject({ kind: 'adapter', name: 'hi-adapter', job_id: done.id });
  });
});
