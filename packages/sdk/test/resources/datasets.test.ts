import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { BadRequestError, ConflictError, type Dataset, FileReadError, toFile } from '../../src/index.js';
import { useMockServer } from '../helpers.js';

const { mock, client } = useMockServer();
const jsonl = '{"prompt": "2+2", "completion": "4"}\n{"prompt": "3+3", "completion": "6"}\n';

describe('datasets', () => {
  it('create from inline texts; list, retrieve, delete', async () => {
    const datasets = client().datasets;
    const created = await datasets.create({ dataset_name: 'greetings', train_texts: ['hi', 'hello'] });
    expect(created).toMatchObject({
      name: 'greetings',
      num_texts: 2,
      status: 'uploaded',
      format: 'text',
      source: 'inline',
    });
    expect(await datasets.retrieve(created.id)).toEqual(created);
    expect(await datasets.get(created.id)).toEqual(created);
    expect((await datasets.list()).data.map((d) => d.id)).toEqual([created.id]);
    expect(await datasets.delete(created.id)).toEqual({ id: created.id, deleted: true });
    expect((await datasets.list()).total).toBe(0);
  });

  it('names a bad JSONL line', async () => {
    const error = await client()
      .datasets.create({ jsonl: '{"text": "ok"}\nnot json\n' })
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(BadRequestError);
    expect(error).toMatchObject({
      code: 'invalid_dataset',
      message: '400 invalid_dataset: Line 2 is not valid JSON.',
    });
  });

  it('upload accepts a path, a Buffer, a Uint8Array, a Blob, a web stream and a Node stream', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tunery-'));
    try {
      const path = join(dir, 'math.jsonl');
      await writeFile(path, jsonl);
      const bytes = new TextEncoder().encode(jsonl);
      const sources = [
        path,
        Buffer.from(jsonl),
        bytes,
        new Blob([jsonl]),
        new Response(jsonl).body!,
        Readable.from([Buffer.from(jsonl)]),
      ];
      const created: Dataset[] = [];
      for (const file of sources) created.push(await client().datasets.upload({ file, name: 'math' }));
      for (const d of created)
        expect(d).toMatchObject({
          name: 'math',
          num_examples: 2,
          format: 'prompt_completion',
          source: 'upload',
        });
      expect(new Set(created.map((d) => d.sha256)).size).toBe(1);
      const parts = mock.state.requests.map((r) => r.headers['content-type']);
      expect(parts.every((type) => type?.startsWith('multipart/form-data; boundary='))).toBe(true);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('uploads JSONL text made into a file by toFile, with its name', async () => {
    const file = await toFile(jsonl, 'math.jsonl');
    expect(file).toBeInstanceOf(File);
    expect(file.name).toBe('math.jsonl');
    const created = await client().datasets.upload({ file, name: 'math' });
    expect(created).toMatchObject({ name: 'math', num_examples: 2, format: 'prompt_completion' });
    const fromBytes = await toFile(new TextEncoder().encode(jsonl), 'b.jsonl');
    expect(await fromBytes.text()).toBe(jsonl);
  });

  it('names the path it cannot read in a FileReadError, before sending anything', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tunery-'));
    try {
      for (const path of [join(dir, 'missing.jsonl'), dir]) {
        const error = await client()
          .datasets.upload({ file: path })
          .catch((e: unknown) => e);
        expect(error).toBeInstanceOf(FileReadError);
        expect(error).toMatchObject({ path });
        expect((error as Error).message).toContain(path);
      }
      expect(mock.state.requests).toHaveLength(0);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('re-sends the whole stream on a retry', async () => {
    mock.failNext('createDataset', 503, { headers: { 'retry-after-ms': '0' } });
    const created = await client().datasets.upload({
      file: new Response(jsonl).body!,
      filename: 'math.jsonl',
    });
    expect(created.num_examples).toBe(2);
    expect(mock.state.requests).toHaveLength(2);
  });

  it('builds from trajectories, and refuses to delete a dataset a job uses', async () => {
    const tunery = client();
    await tunery.trajectories.create({
      source: 'chat',
      llm_calls: [{ system_prompt: 'Be brief.', user_prompt: 'Hi?', response: 'Hi.' }],
    });
    await expect(tunery.datasets.build({ source: 'email' })).rejects.toMatchObject({
      code: 'invalid_dataset',
    });
    const built = await tunery.datasets.build({ name: 'from-chat', min_llm_calls_per_trajectory: 1 });
    expect(built).toMatchObject({
      format: 'chat',
      num_examples: 1,
      trajectory_count: 1,
      source: 'trajectories',
    });
    await tunery.training.jobs.create({ base_model: 'tiny-llama', dataset_id: built.id });
    await expect(tunery.datasets.delete(built.id)).rejects.toBeInstanceOf(ConflictError);
  });
});
