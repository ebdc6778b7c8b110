import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { newId } from '../src/ids.js';
import { enqueueJob } from '../src/queue/enqueue.js';
import { parseJsonl } from '../src/services/datasets.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

const chat = (user: string, answer: string) => ({
  messages: [
    { role: 'user', content: user },
    { role: 'assistant', content: answer },
  ],
});

describe('parseJsonl', () => {
  it('skips blank lines and names the bad line', () => {
    expect(parseJsonl('{"text":"a"}\n\n{"text":"b"}\n')).toEqual([{ text: 'a' }, { text: 'b' }]);
    expect(() => parseJsonl('{"text":"a"}\n\n{"text": oops}')).toThrow(/^line 3: not valid JSON/);
    expect(() => parseJsonl('{"text":"a"}\n{"prompt":"p","completion":"c"}')).toThrow(/^line 2: format/);
  });

  it('converts Alpaca and ShareGPT rows to chat', () => {
    const alpaca = [
      '{"instruction":"Add","input":"2+2","output":"4","text":"rendered prompt"}',
      '{"instruction":"Greet","output":"hi"}',
    ].join('\n');
    expect(parseJsonl(alpaca)).toEqual([chat('Add\n\n2+2', '4'), chat('Greet', 'hi')]);
    const sharegpt = JSON.stringify({
      conversations: [
        { from: 'system', value: 'be brief' },
        { from: 'human', value: 'hi' },
        { from: 'gpt', value: 'hello' },
      ],
    });
    expect(parseJsonl(sharegpt)).toEqual([
      { messages: [{ role: 'system', content: 'be brief' }, ...chat('hi', 'hello').messages] },
    ]);
    // both are chat once converted, so they share a dataset with `messages` rows
    expect(parseJsonl(`${alpaca}\n${sharegpt}\n${JSON.stringify(chat('a', 'b'))}`)).toHaveLength(4);
  });

  it('names the bad Alpaca or ShareGPT line', () => {
    const cases: [string, RegExp][] = [
      ['{"instruction":"x"}', /^line 2: "output" must be a non-empty string/],
      ['{"instruction":"","output":"y"}', /^line 2: "instruction" must be a non-empty string/],
      ['{"instruction":"x","input":3,"output":"y"}', /^line 2: "input" must be a string/],
      ['{"conversations":[]}', /^line 2: "conversations" must be a non-empty array/],
      ['{"conversations":[{"from":"bot","value":"x"}]}', /^line 2: conversations\[0\]\.from must be one of/],
      ['{"conversations":[{"from":"gpt","value":1}]}', /^line 2: conversations\[0\]\.value must be a string/],
      ['{"conversations":[{"from":"human","value":"x"}]}', /^line 2: .*non-empty gpt turn/],
      ['{"instruction":"x","output":"y"}\n{"text":"t"}', /^line 3: format text differs .* chat/],
    ];
    for (const [line, message] of cases) {
      expect(() => parseJsonl(`{"instruction":"ok","output":"ok"}\n${line}`)).toThrow(message);
    }
  });
});

describe.each(DATABASES)('datasets on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(async () => {
    await server?.stop();
  });

  const create = (json: unknown, init: { key?: string; headers?: Record<string, string> } = {}) =>
    server.api('/v1/datasets', { method: 'POST', json, ...init });

  it('stores inline train_texts as seed 003 describes', async () => {
    const res = await create({ dataset_name: 'my_dataset', train_texts: ['hello world', 'second text'] });
    expect(res.status).toBe(201);
    const body = await res.json();
    expect(body).toMatchObject({
      name: 'my_dataset',
      dataset_name: 'my_dataset',
      num_texts: 2,
      num_examples: 2,
      example_count: 2,
      format: 'text',
      source: 'inline',
      status: 'uploaded',
      message: 'Training data uploaded successfully with 2 texts',
    });
    expect(body.id).toMatch(/^ds_/);
    const jsonl = '{"text":"hello world"}\n{"text":"second text"}\n';
    expect(body.size_bytes).toBe(Buffer.byteLength(jsonl));
    expect(body.tokens_est).toBe(Math.ceil(Buffer.byteLength(jsonl) / 4));
    const file = await server.ctx.knex('files').where({ owner_kind: 'dataset', owner_id: body.id }).first();
    expect(await readFile(join(server.dataDir, 'files', file.rel_path), 'utf8')).toBe(jsonl);
    expect(file.sha256).toBe(body.sha256);
  });

  it('stores records and JSONL, one format per dataset', async () => {
    const records = await create({ name: 'chats', records: [chat('hi', 'hello'), chat('2+2?', '4')] });
    expect(records.status).toBe(201);
    expect(await records.json()).toMatchObject({ format: 'chat', num_examples: 2, source: 'inline' });

    const jsonl = await create({
      name: 'pc',
      jsonl: '{"prompt":"a","completion":"b"}\n{"prompt":"","completion":"c"}\n',
    });
    expect(jsonl.status).toBe(201);
    expect(await jsonl.json()).toMatchObject({
      format: 'prompt_completion',
      num_examples: 2,
      source: 'upload',
    });
  });

  it('accepts a multipart JSONL upload', async () => {
    const form = new FormData();
    form.append('name', 'uploaded');
    form.append('file', new Blob(['{"text":"one"}\n{"text":"two"}\n{"text":"three"}\n']), 'data.jsonl');
    const res = await server.api('/v1/datasets', { method: 'POST', body: form });
    expect(res.status).toBe(201);
    expect(await res.json()).toMatchObject({
      name: 'uploaded',
      num_examples: 3,
      source: 'upload',
      format: 'text',
    });

    // The idempotency key of a multipart upload is bound to the file's content.
    const upload = (content: string) => {
      const f = new FormData();
      f.append('idempotency_key', 'upload-1');
      f.append('file', new Blob([content]), 'x.jsonl');
      return server.api('/v1/datasets', { method: 'POST', body: f });
    };
    const first = await (await upload('{"text":"a"}\n')).json();
    expect((await (await upload('{"text":"a"}\n')).json()).id).toBe(first.id);
    const changed = await upload('{"text":"b"}\n');
    expect(changed.status).toBe(409);
    expect((await changed.json()).error.code).toBe('idempotency_conflict');

    const bad = new FormData();
    bad.append('file', new Blob(['{"text":"one"}\n{"text":""}\n']), 'bad.jsonl');
    const refused = await server.api('/v1/datasets', { method: 'POST', body: bad });
    expect(refused.status).toBe(400);
    const err = (await refused.json()).error;
    expect(err).toMatchObject({ code: 'invalid_dataset', param: 'file' });
    expect(err.message).toMatch(/^line 2: /);
  });

  it('stores Alpaca and ShareGPT records as chat, and names a bad one', async () => {
    const res = await create({
      name: 'mixed-intake',
      records: [
        { instruction: 'Add', input: '2+2', output: '4' },
        {
          conversations: [
            { from: 'human', value: 'hi' },
            { from: 'gpt', value: 'hello' },
          ],
        },
      ],
    });
    expect(res.status).toBe(201);
    const body = await res.json();
    expect(body).toMatchObject({ format: 'chat', num_examples: 2 });
    const file = await server.ctx.knex('files').where({ owner_kind: 'dataset', owner_id: body.id }).first();
    const lines = (await readFile(join(server.dataDir, 'files', file.rel_path), 'utf8')).trim().split('\n');
    expect(lines.map((l) => JSON.parse(l))).toEqual([chat('Add\n\n2+2', '4'), chat('hi', 'hello')]);

    // the schema refuses a bad inline record; a JSONL line is checked by the converter
    const badRecord = await create({ records: [{ conversations: [{ from: 'bot', value: 'x' }] }] });
    expect(badRecord.status).toBe(400);
    expect((await badRecord.json()).error).toMatchObject({ code: 'invalid_request' });
    const badLine = await create({ jsonl: '{"instruction":"a","output":"b"}\n{"instruction":"a"}\n' });
    expect(badLine.status).toBe(400);
    const err = (await badLine.json()).error;
    expect(err).toMatchObject({ code: 'invalid_dataset', param: 'jsonl' });
    expect(err.message).toMatch(/^line 2: "output" must be a non-empty string/);
  });

  it('names the bad JSONL line', async () => {
    const res = await create({ jsonl: '{"text":"ok"}\n{"text":"ok"}\n{"text": nope}\n' });
    expect(res.status).toBe(400);
    const err = (await res.json()).error;
    expect(err).toMatchObject({ code: 'invalid_dataset', param: 'jsonl' });
    expect(err.message).toMatch(/^line 3: not valid JSON/);
  });

  it('refuses a chat record without an assistant turn, and mixed formats', async () => {
    const noAssistant = await create({
      records: [chat('a', 'b'), { messages: [{ role: 'user', content: 'x' }] }],
    });
    expect(noAssistant.status).toBe(400);
    const err = (await noAssistant.json()).error;
    expect(err).toMatchObject({ code: 'invalid_dataset', param: 'records' });
    expect(err.message).toMatch(/^record 2: .*assistant/);

    const mixed = await create({ jsonl: '{"text":"a"}\n{"messages":[{"role":"assistant","content":"b"}]}' });
    expect(mixed.status).toBe(400);
    expect((await mixed.json()).error.message).toMatch(/^line 2: format chat differs/);
  });

  it('wants exactly one of train_texts, records, jsonl', async () => {
    const none = await create({ name: 'empty' });
    expect(none.status).toBe(400);
    expect((await none.json()).error).toMatchObject({ code: 'invalid_request', param: 'train_texts' });

    const two = await create({ train_texts: ['a'], jsonl: '{"text":"a"}' });
    expect(two.status).toBe(400);
    expect((await two.json()).error).toMatchObject({ code: 'invalid_request', param: 'jsonl' });
  });

  it('refuses wrong types and unknown fields', async () => {
    const wrongType = await create({ train_texts: 'not a list' });
    expect(wrongType.status).toBe(400);
    expect((await wrongType.json()).error).toMatchObject({ code: 'invalid_request', param: 'train_texts' });

    const empty = await create({ train_texts: [] });
    expect(empty.status).toBe(400);
    expect((await empty.json()).error.code).toBe('invalid_request');

    const unknown = await create({ train_texts: ['a'], colour: 'blue' });
    expect(unknown.status).toBe(400);
  });

  it('lists newest first with paging, and hides other tenants', async () => {
    const ids: string[] = [];
    for (const name of ['page-a', 'page-b', 'page-c']) {
      const res = await create({ name, train_texts: [name] });
      ids.push((await res.json()).id);
    }
    const first = await (await server.api('/v1/datasets?limit=2')).json();
    expect(first.datasets.map((d: { id: string }) => d.id)).toEqual([ids[2], ids[1]]);
    expect(first.has_more).toBe(true);
    const all = await (await server.api('/v1/datasets?limit=100')).json();
    expect(all.total).toBe(all.datasets.length);
    expect(all.has_more).toBe(false);

    const badLimit = await server.api('/v1/datasets?limit=101');
    expect(badLimit.status).toBe(400);
    expect((await badLimit.json()).error).toMatchObject({ code: 'invalid_request', param: 'limit' });

    const other = await (await server.api('/v1/datasets', { key: server.otherKey })).json();
    expect(other).toEqual({ datasets: [], total: 0, has_more: false, next_cursor: null });
    const res = await server.api(`/v1/datasets/${ids[0]}`, { key: server.otherKey });
    expect(res.status).toBe(404);
    expect((await res.json()).error).toMatchObject({ code: 'not_found', param: 'dataset_id' });
    expect(
      (await server.api(`/v1/datasets/${ids[0]}`, { method: 'DELETE', key: server.otherKey })).status,
    ).toBe(404);
  });

  it('is idempotent per key', async () => {
    const body = { name: 'idem', train_texts: ['x'], idempotency_key: 'ds-1' };
    const a = await (await create(body)).json();
    const b = await (await create(body)).json();
    expect(b.id).toBe(a.id);
    const headerA = await (
      await create({ train_texts: ['y'] }, { headers: { 'Idempotency-Key': 'ds-h' } })
    ).json();
    const headerB = await (
      await create({ train_texts: ['y'] }, { headers: { 'Idempotency-Key': 'ds-h' } })
    ).json();
    expect(headerB.id).toBe(headerA.id);

    const changed = await create({ ...body, train_texts: ['z'] });
    expect(changed.status).toBe(409);
    expect((await changed.json()).error.code).toBe('idempotency_conflict');
    // Keys are per tenant: another tenant's same key is a new dataset.
    const other = await (await create(body, { key: server.otherKey })).json();
    expect(other.id).not.toBe(a.id);
  });

  it('deletes a dataset and its file, but not while a job uses it', async () => {
    const ds = await (await create({ name: 'doomed', train_texts: ['bye'] })).json();
    const file = await server.ctx.knex('files').where({ owner_kind: 'dataset', owner_id: ds.id }).first();
    const path = join(server.dataDir, 'files', file.rel_path);
    const jobId = newId('job');
    await enqueueJob(server.ctx, server.ctx.knex, {
      id: jobId,
      tenantId: 'default',
      kind: 'training',
      type: 'finetune',
      method: 'lora',
      config: {},
      datasetId: ds.id,
    });
    const busy = await server.api(`/v1/datasets/${ds.id}`, { method: 'DELETE' });
    expect(busy.status).toBe(409);
    expect((await busy.json()).error.code).toBe('conflict');

    await server.ctx.knex('jobs').where({ id: jobId }).update({ status: 'cancelled' });
    const res = await server.api(`/v1/datasets/${ds.id}`, { method: 'DELETE' });
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ id: ds.id, deleted: true });
    await expect(stat(path)).rejects.toThrow();
    expect((await server.api(`/v1/datasets/${ds.id}`)).status).toBe(404);
    expect(await server.ctx.knex('files').where({ id: file.id }).first()).toBeUndefined();
  });

  describe('built from trajectories', () => {
    const record = (json: unknown, key?: string) =>
      server.api('/v1/trajectories', { method: 'POST', json, key });

    it('turns every LLM call into a chat example, newest first, with filters', async () => {
      await record({
        source: 'chat',
        llm_calls: [
          { system_prompt: 'Be brief.', user_prompt: 'hi', response: 'hello' },
          { messages: [{ role: 'user', content: 'what is 2+2?' }], response: '4' },
          { user_prompt: 'no answer' },
        ],
      });
      await record({ source: 'cron', llm_calls: [{ user_prompt: 'ping', response: 'pong' }] });
      await record({ source: 'chat', llm_calls: [] });

      const res = await server.api('/v1/datasets/build', {
        method: 'POST',
        json: { name: 'from-trajectories', min_llm_calls_per_trajectory: 1 },
      });
      expect(res.status).toBe(201);
      const ds = await res.json();
      expect(ds).toMatchObject({
        format: 'chat',
        num_examples: 3,
        trajectory_count: 2,
        source: 'trajectories',
      });
      const file = await server.ctx.knex('files').where({ owner_kind: 'dataset', owner_id: ds.id }).first();
      const lines = (await readFile(join(server.dataDir, 'files', file.rel_path), 'utf8')).trim().split('\n');
      // Newest trajectory (cron) first.
      expect(JSON.parse(lines[0]!)).toEqual(chat('ping', 'pong'));
      expect(JSON.parse(lines[1]!)).toEqual({
        messages: [
          { role: 'system', content: 'Be brief.' },
          { role: 'user', content: 'hi' },
          { role: 'assistant', content: 'hello' },
        ],
      });

      const onlyChat = await (
        await server.api('/v1/datasets/build', {
          method: 'POST',
          json: { source: 'chat', min_llm_calls_per_trajectory: 2 },
        })
      ).json();
      expect(onlyChat).toMatchObject({ num_examples: 2, trajectory_count: 1 });

      const limited = await (
        await server.api('/v1/datasets/build', { method: 'POST', json: { limit: 1 } })
      ).json();
      expect(limited).toMatchObject({ num_examples: 1, trajectory_count: 1 });
    });

    it('refuses when no trajectory qualifies', async () => {
      const res = await server.api('/v1/datasets/build', {
        method: 'POST',
        json: { min_llm_calls_per_trajectory: 50 },
      });
      expect(res.status).toBe(400);
      expect((await res.json()).error.code).toBe('invalid_dataset');
      const other = await server.api('/v1/datasets/build', {
        method: 'POST',
        json: {},
        key: server.otherKey,
      });
      expect(other.status).toBe(400);
      const badRange = await server.api('/v1/datasets/build', { method: 'POST', json: { limit: 0 } });
      expect((await badRange.json()).error).toMatchObject({ code: 'invalid_request', param: 'limit' });
    });
  });
});
