import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

type Envelope = { total: number; has_more: boolean; next_cursor: string | null } & Record<string, unknown>;

describe.each(DATABASES)('cursor pages on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(async () => {
    await server?.stop();
  });

  const list = async (path: string): Promise<Envelope> => {
    const res = await server.api(path);
    expect(res.status, `${path} ${res.status === 200 ? '' : await res.clone().text()}`).toBe(200);
    return (await res.json()) as Envelope;
  };
  const createDataset = (name: string) =>
    server.api('/v1/datasets', { method: 'POST', json: { name, train_texts: ['a b c'] } });

  /** Every page of `path` (with `limit`), following next_cursor, calling `between` after each page. */
  async function walk(path: string, key: string, between: () => Promise<unknown> = async () => {}) {
    const names: string[] = [];
    let page = await list(`${path}?limit=2`);
    for (;;) {
      names.push(...(page[key] as { id?: string; name: string }[]).map((item) => item.id ?? item.name));
      if (!page.has_more) {
        expect(page.next_cursor).toBeNull();
        return names;
      }
      await between();
      page = await list(`${path}?limit=2&after=${encodeURIComponent(page.next_cursor as string)}`);
    }
  }

  it('walks a list that grows meanwhile without repeating or skipping an item', async () => {
    for (let i = 0; i < 7; i++) expect((await createDataset(`walk-${i}`)).status).toBe(201);
    const before = (await list('/v1/datasets?limit=100')).datasets as { id: string }[];
    // Each new dataset sorts first (newest first), which shifts every offset by one.
    let n = 0;
    const walked = await walk('/v1/datasets', 'datasets', () => createDataset(`during-${n++}`));
    expect(walked).toEqual(before.map((d) => d.id));
  });

  it('walks the base-model catalog and the templates (built-ins, then custom) in list order', async () => {
    const catalog = (await list('/v1/base-models?limit=100')).models as { id: string }[];
    expect(await walk('/v1/base-models', 'models')).toEqual(catalog.map((m) => m.id));
    for (const name of ['cur-1', 'cur-2', 'cur-3']) {
      const res = await server.api('/v1/training/templates', {
        method: 'POST',
        json: { name, config: { type: 'train' } },
      });
      expect(res.status).toBe(201);
    }
    const templates = (await list('/v1/training/templates?limit=100')).templates as { name: string }[];
    expect(await walk('/v1/training/templates', 'templates')).toEqual(templates.map((t) => t.name));
  });

  it('refuses a cursor that is not this list’s, and offset with after', async () => {
    const datasets = await list('/v1/datasets?limit=1');
    const templates = await list('/v1/training/templates?limit=1');
    for (const after of ['not-a-cursor', templates.next_cursor as string]) {
      const res = await server.api(`/v1/datasets?after=${encodeURIComponent(after)}`);
      expect(res.status).toBe(400);
      expect((await res.json()).error).toMatchObject({ code: 'invalid_cursor', param: 'after' });
    }
    const both = await server.api(`/v1/datasets?offset=1&after=${datasets.next_cursor}`);
    expect(both.status).toBe(400);
    expect((await both.json()).error).toMatchObject({ code: 'invalid_request', param: 'after' });
  });
});
