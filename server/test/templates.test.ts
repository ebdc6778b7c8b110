import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { getTemplateConfig } from '../src/services/templates.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

const BUILTINS = ['lora-default', 'qlora-7b', 'full-small', 'grow-2x', 'contract-half'];

describe.each(DATABASES)('templates on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(async () => {
    await server?.stop();
  });

  const create = (json: unknown, key?: string) =>
    server.api('/v1/training/templates', { method: 'POST', json, key });

  it('lists the built-ins, complete and read-only', async () => {
    const list = await (await server.api('/v1/training/templates')).json();
    expect(list.templates.map((t: { name: string }) => t.name)).toEqual(BUILTINS);
    expect(list).toMatchObject({ total: 5, has_more: false });
    const lora = list.templates[0];
    expect(lora).toMatchObject({
      builtin: true,
      config: { type: 'finetune', method: 'lora', lora_config: { r: 16 } },
    });
    // Built-ins carry the spec's defaults for what they do not set.
    expect(lora.config.training_config).toMatchObject({ learning_rate: 2e-4, save_steps: 500, seed: 42 });
    expect((await server.api('/v1/training/templates/qlora-7b')).status).toBe(200);
  });

  it('saves, gets and deletes a custom template', async () => {
    const config = { type: 'finetune', method: 'lora', base_model: 'llama-3.2-1b', lora_config: { r: 8 } };
    const res = await create({ name: 'my-lora', description: 'small rank', config });
    expect(res.status).toBe(201);
    const saved = await res.json();
    expect(saved).toMatchObject({ name: 'my-lora', description: 'small rank', builtin: false });
    expect(saved.config).toMatchObject(config);

    const list = await (await server.api('/v1/training/templates')).json();
    expect(list.templates.map((t: { name: string }) => t.name)).toEqual([...BUILTINS, 'my-lora']);
    expect(await (await server.api('/v1/training/templates/my-lora')).json()).toEqual(saved);
    expect(await getTemplateConfig(server.ctx, 'default', 'my-lora')).toEqual(saved.config);

    const deleted = await server.api('/v1/training/templates/my-lora', { method: 'DELETE' });
    expect(await deleted.json()).toEqual({ id: 'my-lora', deleted: true });
    const gone = await server.api('/v1/training/templates/my-lora');
    expect(gone.status).toBe(404);
    expect((await gone.json()).error).toMatchObject({ code: 'not_found', param: 'template_name' });
  });

  it('pages across built-ins and custom templates, newest custom first', async () => {
    for (const name of ['page-1', 'page-2', 'page-3']) await create({ name, config: { type: 'train' } });
    const page = await (await server.api('/v1/training/templates?limit=3&offset=4')).json();
    expect(page.templates.map((t: { name: string }) => t.name)).toEqual([
      'contract-half',
      'page-3',
      'page-2',
    ]);
    expect(page).toMatchObject({ total: 8, has_more: true });
    const last = await (await server.api('/v1/training/templates?limit=3&offset=7')).json();
    expect(last.templates.map((t: { name: string }) => t.name)).toEqual(['page-1']);
    expect(last.has_more).toBe(false);
  });

  it('never shadows or deletes a built-in, and refuses duplicates', async () => {
    const shadow = await create({ name: 'lora-default', config: {} });
    expect(shadow.status).toBe(409);
    expect((await shadow.json()).error).toMatchObject({ code: 'conflict', param: 'name' });
    const del = await server.api('/v1/training/templates/grow-2x', { method: 'DELETE' });
    expect(del.status).toBe(409);
    await create({ name: 'twice', config: {} });
    const twice = await create({ name: 'twice', config: { type: 'merge' } });
    expect(twice.status).toBe(409);
    expect((await twice.json()).error.code).toBe('conflict');
  });

  it('refuses bad configurations', async () => {
    const rank = await create({ name: 'bad', config: { lora_config: { r: 0 } } });
    expect(rank.status).toBe(400);
    expect((await rank.json()).error).toMatchObject({
      code: 'invalid_request',
      param: 'config.lora_config.r',
    });
    const method = await create({ name: 'bad', config: { method: 'magic' } });
    expect((await method.json()).error).toMatchObject({ code: 'invalid_request', param: 'config.method' });
    const missing = await create({ name: 'bad' });
    expect((await missing.json()).error).toMatchObject({ code: 'invalid_request', param: 'config' });
    const badName = await create({ name: '../etc', config: {} });
    expect((await badName.json()).error).toMatchObject({ code: 'invalid_request', param: 'name' });
    const unknown = await create({ name: 'bad', config: { learning_rate: 0.1 } });
    expect(unknown.status).toBe(400);
    // presets that contradict each other, or that the template's type would not use
    const twice = await create({
      name: 'bad',
      config: { hyperparams: { steps: 10 }, training_config: { max_steps: 20 } },
    });
    expect((await twice.json()).error).toMatchObject({
      code: 'invalid_config',
      param: 'config.training_config.max_steps',
    });
    const split = await create({
      name: 'bad',
      config: { eval_split: 0.1, training_config: { eval_split: 0.3 } },
    });
    expect((await split.json()).error).toMatchObject({ param: 'config.training_config.eval_split' });
    const unused = await create({ name: 'bad', config: { type: 'contract', lora_config: { r: 4 } } });
    expect((await unused.json()).error).toMatchObject({
      code: 'invalid_config',
      param: 'config.lora_config',
    });
    // a full fine-tune would ignore LoRA presets
    const full = await create({ name: 'bad', config: { method: 'full', lora_config: { r: 4 } } });
    expect((await full.json()).error).toMatchObject({
      code: 'invalid_config',
      param: 'config.lora_config.r',
    });
    const agreeing = await create({
      name: 'agreeing',
      config: { hyperparams: { steps: 10 }, training_config: { max_steps: 10 } },
    });
    expect(agreeing.status).toBe(201);
    await server.api('/v1/training/templates/agreeing', { method: 'DELETE' });
  });

  it('keeps tenants apart and is idempotent per key', async () => {
    await create({ name: 'private', config: {} });
    expect((await server.api('/v1/training/templates/private', { key: server.otherKey })).status).toBe(404);
    expect(
      (await server.api('/v1/training/templates/private', { method: 'DELETE', key: server.otherKey })).status,
    ).toBe(404);
    // The name is free for another tenant.
    expect((await create({ name: 'private', config: {} }, server.otherKey)).status).toBe(201);

    const body = { name: 'idem', config: { type: 'train' }, idempotency_key: 'tpl-1' };
    const a = await create(body);
    const b = await create(body);
    expect(a.status).toBe(201);
    expect(b.status).toBe(201);
    expect(await b.json()).toEqual(await a.json());
    const changed = await create({ ...body, description: 'other' });
    expect(changed.status).toBe(409);
    expect((await changed.json()).error.code).toBe('idempotency_conflict');
  });

  it('creates a template anew when its key is repeated after the template was deleted', async () => {
    const json = { name: 'phoenix', idempotency_key: 'phoenix-1', config: { method: 'lora' } };
    const first = await server.api('/v1/training/templates', { method: 'POST', json });
    expect(first.status).toBe(201);
    expect((await server.api('/v1/training/templates/phoenix', { method: 'DELETE' })).status).toBe(200);
    const again = await server.api('/v1/training/templates', { method: 'POST', json });
    expect(again.status).toBe(201);
    expect((await again.json()).name).toBe('phoenix');
  });
});
