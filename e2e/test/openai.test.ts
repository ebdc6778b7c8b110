// The OpenAI-compatible surface (/openai/v1) driven by the official `openai` client against the real
// server (embedded PGlite) and a CPU worker: upload a chat JSONL, fine-tune the tiny model, read its
// events (auto-paginated) and checkpoints, list models, cancel a second job, and the typed errors.
import OpenAI, { BadRequestError, ConflictError, NotFoundError, toFile } from 'openai';
import { describe, expect, it } from 'vitest';
import { until } from '../src/stack.js';
import { TINY, useStack } from '../src/use-stack.js';

const stack = useStack({ name: 'openai', database: 'pglite', leaseSeconds: 6 });

const openai = () =>
  new OpenAI({ baseURL: `${stack().url}/openai/v1`, apiKey: stack().apiKey, maxRetries: 0 });

const chat = (user: string, assistant: string) =>
  JSON.stringify({
    messages: [
      { role: 'system', content: 'Answer in one word.' },
      { role: 'user', content: user },
      { role: 'assistant', content: assistant },
    ],
  });

/** 10 examples: 2 epochs at batch size 4 are ceil(2 × 10 / 4) = 5 steps. */
const TRAIN_JSONL = `${[
  ['Say hi', 'hi'],
  ['Say bye', 'bye'],
  ['Say thanks', 'thanks'],
  ['Name a colour', 'blue'],
  ['Name a fruit', 'apple'],
  ['Name an animal', 'cat'],
  ['What is 2 + 2?', '4'],
  ['What is 3 + 3?', '6'],
  ['Capital of France?', 'Paris'],
  ['Capital of Italy?', 'Rome'],
]
  .map(([u, a]) => chat(u!, a!))
  .join('\n')}\n`;

const upload = async (text: string, name: string) =>
  openai().files.create({ file: await toFile(Buffer.from(text), name), purpose: 'fine-tune' });

describe('OpenAI-compatible fine-tuning with the openai client', () => {
  it('refuses a file with a bad line as BadRequestError naming the line', async () => {
    const bad = `${chat('Say hi', 'hi')}\n${JSON.stringify({ messages: [{ role: 'user', content: 'no answer' }] })}\n`;
    const err = await upload(bad, 'bad.jsonl').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BadRequestError);
    expect(err).toMatchObject({ status: 400, code: 'invalid_dataset', type: 'invalid_request_error' });
    expect((err as BadRequestError).message).toContain('line 2');

    const text = await upload(`${JSON.stringify({ text: 'plain text' })}\n`, 'text.jsonl').catch((e) => e);
    expect(text).toBeInstanceOf(BadRequestError);
    expect((text as BadRequestError).message).toContain('line 1');
  });

  it('uploads, fine-tunes, and shows events, checkpoints and the fine-tuned model', async () => {
    const client = openai();
    const file = await upload(TRAIN_JSONL, 'train.jsonl');
    expect(file).toMatchObject({
      object: 'file',
      purpose: 'fine-tune',
      status: 'processed',
      filename: 'train.jsonl',
    });
    expect(await client.files.retrieve(file.id)).toEqual(file);
    const listed = [];
    for await (const f of client.files.list()) listed.push(f.id);
    expect(listed).toContain(file.id);
    const content = await (await client.files.content(file.id)).text();
    expect(content.trim().split('\n')).toHaveLength(10);

    const created = await client.fineTuning.jobs.create({
      model: TINY,
      training_file: file.id,
      validation_file: file.id,
      suffix: 'oai-e2e',
      seed: 7,
      method: {
        type: 'supervised',
        supervised: { hyperparameters: { n_epochs: 2, batch_size: 4, learning_rate_multiplier: 50 } },
      },
    });
    expect(created).toMatchObject({
      object: 'fine_tuning.job',
      status: 'queued',
      model: TINY,
      training_file: file.id,
      fine_tuned_model: null,
      seed: 7,
      user_provided_suffix: 'oai-e2e',
      hyperparameters: { n_epochs: 2, batch_size: 4 },
    });
    expect(created.hyperparameters.learning_rate_multiplier).toBeCloseTo(50, 6);

    // A second job, paused and resumed, then cancelled, while the first holds the only worker (or
    // just after it starts: then a resume is refused until its run has stopped, and is tried again).
    const second = await client.fineTuning.jobs.create({ model: TINY, training_file: file.id });
    expect((await client.fineTuning.jobs.pause(second.id)).status).toBe('paused');
    const resumed = await until(
      'the paused job resumed',
      () =>
        client.fineTuning.jobs.resume(second.id).catch((err: unknown) => {
          if (err instanceof ConflictError) return undefined;
          throw err;
        }),
      { timeoutMs: 60_000, intervalMs: 250 },
    );
    expect(resumed.status).toBe('queued');
    const cancelling = await client.fineTuning.jobs.cancel(second.id);
    expect(cancelling.id).toBe(second.id);
    await until(
      'the second job cancelled',
      async () => {
        const job = await client.fineTuning.jobs.retrieve(second.id);
        return job.status === 'cancelled' ? job : undefined;
      },
      { timeoutMs: 60_000, intervalMs: 250 },
    );

    const done = await until(
      'the fine-tune to finish',
      async () => {
        const job = await client.fineTuning.jobs.retrieve(created.id);
        return ['succeeded', 'failed', 'cancelled'].includes(job.status) ? job : undefined;
      },
      { timeoutMs: 100_000, intervalMs: 250 },
    );
    expect(done, JSON.stringify(done.error)).toMatchObject({ status: 'succeeded', error: null });
    expect(done.fine_tuned_model).toMatch(/^model_/);
    expect(done.trained_tokens).toBeGreaterThan(0);
    expect(done.finished_at).toBeGreaterThanOrEqual(done.created_at);
    // the validation file was evaluated on: the final eval loss and perplexity are on it
    expect(done.validation_file).toBe(file.id);
    const result = await stack().client.training.jobs.result(created.id);
    expect(result.details).toMatchObject({ ppl_split: 'eval', eval_loss_final: expect.any(Number) });

    const jobIds = [];
    for await (const job of client.fineTuning.jobs.list({ limit: 1 })) jobIds.push(job.id);
    expect(jobIds).toEqual([second.id, created.id]);

    // Events: auto-pagination two at a time walks all of them, newest first, none twice.
    const events = [];
    for await (const event of client.fineTuning.jobs.listEvents(created.id, { limit: 2 })) events.push(event);
    const tunery = await stack().client.training.jobs.events(created.id);
    expect(events).toHaveLength(tunery.events.length);
    expect(new Set(events.map((e) => e.id)).size).toBe(events.length);
    expect(events[0]!.data).toMatchObject({ kind: 'completed' });
    // newest first: the event sequence numbers (the ids' tails) fall
    const seqs = events.map((e) => Number(e.id.split('-').at(-1)));
    expect(seqs).toEqual([...seqs].sort((a, b) => b - a));
    expect(events.every((e) => e.object === 'fine_tuning.job.event')).toBe(true);

    const checkpoints = [];
    for await (const c of client.fineTuning.jobs.checkpoints.list(created.id)) checkpoints.push(c);
    expect(checkpoints[0]).toMatchObject({
      object: 'fine_tuning.job.checkpoint',
      fine_tuning_job_id: created.id,
      step_number: 5,
      metrics: { step: 5 },
    });

    const models = [];
    for await (const m of client.models.list()) models.push(m.id);
    expect(models).toEqual(expect.arrayContaining([TINY, done.fine_tuned_model]));
    expect(await client.models.retrieve(done.fine_tuned_model!)).toMatchObject({ object: 'model' });
    expect(await client.models.retrieve(TINY)).toMatchObject({ id: TINY, object: 'model' });

    // Call the fine-tuned model with the same client, through a serving worker.
    stack().startWorker('serve', undefined, ['--serve']);
    const ask = { model: done.fine_tuned_model!, messages: [{ role: 'user' as const, content: 'Say hi' }] };
    const answer = await until(
      'a serving worker to answer',
      () => client.chat.completions.create({ ...ask, temperature: 0, max_tokens: 8 }).catch(() => undefined),
      { timeoutMs: 60_000, intervalMs: 500 },
    );
    expect(answer).toMatchObject({
      object: 'chat.completion',
      model: done.fine_tuned_model,
      choices: [{ index: 0, message: { role: 'assistant' } }],
    });
    expect(['stop', 'length']).toContain(answer.choices[0]!.finish_reason);
    expect(answer.usage!.completion_tokens).toBeGreaterThan(0);
    expect(answer.usage!.completion_tokens).toBeLessThanOrEqual(8);
    // Greedy decoding is repeatable, and the stream carries the same text.
    const again = await client.chat.completions.create({ ...ask, temperature: 0, max_tokens: 8 });
    expect(again.choices[0]!.message.content).toBe(answer.choices[0]!.message.content);
    let streamed = '';
    const stream = await client.chat.completions.create({
      ...ask,
      temperature: 0,
      max_tokens: 8,
      stream: true,
    });
    for await (const chunk of stream) streamed += chunk.choices[0]?.delta.content ?? '';
    expect(streamed).toBe(answer.choices[0]!.message.content);
    // @tunery/sdk's chat method: the same answer, whole and streamed.
    const sdk = stack().client;
    const sdkAnswer = await sdk.chat.completions.create({ ...ask, temperature: 0, max_tokens: 8 });
    expect(sdkAnswer.choices[0]!.message.content).toBe(answer.choices[0]!.message.content);
    let sdkStreamed = '';
    for await (const chunk of await sdk.chat.completions.create({
      ...ask,
      temperature: 0,
      max_tokens: 8,
      stream: true,
    }))
      sdkStreamed += chunk.choices[0]?.delta.content ?? '';
    expect(sdkStreamed).toBe(answer.choices[0]!.message.content);
    const completion = await client.completions.create({
      model: TINY,
      prompt: 'Once',
      max_tokens: 4,
      seed: 1,
    });
    expect(completion).toMatchObject({ object: 'text_completion', usage: { completion_tokens: 4 } });
    expect(completion.choices[0]!.finish_reason).toBe('length');

    // Seed 003's flow: load the adapter the job trained, generate with it by name, unload it.
    const trained = await sdk.training.jobs.retrieve(created.id);
    const adapterName = trained.adapter_name!;
    expect(await sdk.adapters.load(adapterName)).toMatchObject({
      adapter_name: adapterName,
      status: 'loaded',
    });
    expect((await sdk.adapters.retrieve(adapterName)).loaded_on).toHaveLength(1);
    const byAdapter = await sdk.chat.completions.create({
      model: adapterName,
      messages: ask.messages,
      temperature: 0,
      max_tokens: 8,
    });
    // The adapter over its base is the fine-tuned model: the same greedy answer.
    expect(byAdapter.choices[0]!.message.content).toBe(answer.choices[0]!.message.content);
    expect(await sdk.adapters.unload()).toMatchObject({ adapter_name: adapterName, status: 'unloaded' });
    expect((await sdk.adapters.retrieve(adapterName)).loaded_on).toEqual([]);

    // Seed 004's: activate the model, then generate with it as the tenant's default.
    await sdk.models.activate(trained.output_model_id!);
    const byDefault = await sdk.chat.completions.create({
      model: 'default',
      messages: ask.messages,
      temperature: 0,
      max_tokens: 8,
    });
    expect(byDefault.choices[0]!.message.content).toBe(answer.choices[0]!.message.content);
  });

  it('answers unknown objects and refused fields with typed errors', async () => {
    const client = openai();
    await expect(client.models.retrieve('no-such-model')).rejects.toBeInstanceOf(NotFoundError);
    await expect(client.fineTuning.jobs.retrieve('job_nope')).rejects.toBeInstanceOf(NotFoundError);
    await expect(client.files.retrieve('ds_nope')).rejects.toMatchObject({
      status: 404,
      code: 'file_not_found',
    });
    const file = await upload(TRAIN_JSONL, 'again.jsonl');
    const refused = await client.fineTuning.jobs
      .create({
        model: TINY,
        training_file: file.id,
        integrations: [{ type: 'wandb', wandb: { project: 'p' } }],
      })
      .catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(BadRequestError);
    expect(refused).toMatchObject({ param: 'integrations' });
    await expect(
      client.fineTuning.jobs.create({ model: TINY, training_file: 'ds_nope' }),
    ).rejects.toBeInstanceOf(NotFoundError);
    const bad = new OpenAI({ baseURL: `${stack().url}/openai/v1`, apiKey: 'tk_wrong', maxRetries: 0 });
    await expect(bad.models.list()).rejects.toBeInstanceOf(OpenAI.AuthenticationError);
    expect(await client.files.delete(file.id)).toMatchObject({
      id: file.id,
      deleted: true,
    });
  });
});
