import { describe, expect, it } from 'vitest';
import { Page, PagePromise, type TrainingJob } from '../../src/index.js';
import { useMockServer } from '../helpers.js';

const { mock, client } = useMockServer();

async function seedJobs(n: number) {
  const tunery = client();
  const data = await tunery.datasets.create({ train_texts: ['a'] });
  for (let i = 0; i < n; i++)
    await tunery.training.jobs.create({ base_model: 'tiny-llama', dataset_id: data.id });
  mock.state.requests.length = 0;
}

describe('auto-pagination', () => {
  it('walks 250 jobs in pages of 100: 250 distinct jobs in three requests', async () => {
    await seedJobs(250);
    const seen: TrainingJob[] = [];
    for await (const job of client().training.jobs.list({ limit: 100 })) seen.push(job);
    expect(seen).toHaveLength(250);
    expect(new Set(seen.map((j) => j.id)).size).toBe(250);
    const params = mock.state.requests.map((r) => new URL(r.url).searchParams);
    expect(params.map((p) => p.get('offset'))).toEqual(['0', null, null]);
    // Every next page continues from the page before's cursor.
    expect(params.slice(1).every((p) => p.get('after'))).toBe(true);
    expect(mock.state.requests.every((r) => new URL(r.url).searchParams.get('limit') === '100')).toBe(true);
  });

  it('awaits to one Page with data, total, hasNextPage() and getNextPage()', async () => {
    await seedJobs(25);
    const promise = client().training.jobs.list({ limit: 10, status: 'pending' });
    expect(promise).toBeInstanceOf(PagePromise);
    const first = await promise;
    expect(first).toBeInstanceOf(Page);
    expect(first.data).toHaveLength(10);
    expect(first.total).toBe(25);
    expect(first.hasNextPage()).toBe(true);
    const second = await first.getNextPage();
    expect(second.offset).toBe(10);
    const third = await second.getNextPage();
    expect(third.data).toHaveLength(5);
    expect(third.hasNextPage()).toBe(false);
    await expect(third.getNextPage()).rejects.toThrow(/No next page/);
    const ids = [...first.data, ...second.data, ...third.data].map((j) => j.id);
    expect(new Set(ids).size).toBe(25);
  });

  it('iterates pages, and from a later page onwards', async () => {
    await seedJobs(7);
    const page = await client().training.jobs.list({ limit: 3 });
    const sizes: number[] = [];
    for await (const p of page.iterPages()) sizes.push(p.data.length);
    expect(sizes).toEqual([3, 3, 1]);
    const rest: string[] = [];
    for await (const job of await page.getNextPage()) rest.push(job.id);
    expect(rest).toHaveLength(4);
  });

  it('neither repeats nor skips a job when jobs are created during the walk', async () => {
    await seedJobs(6);
    const tunery = client();
    const data = await tunery.datasets.create({ train_texts: ['a'] });
    const seen: string[] = [];
    for await (const page of (await tunery.training.jobs.list({ limit: 2 })).iterPages()) {
      seen.push(...page.data.map((j) => j.id));
      // Newest first: each new job lands before the pages already read, shifting every offset.
      await tunery.training.jobs.create({ base_model: 'tiny-llama', dataset_id: data.id });
    }
    expect(seen).toHaveLength(6);
    expect(new Set(seen).size).toBe(6);
  });

  it('keeps filters on every page and starts from the given offset', async () => {
    await seedJobs(5);
    const tunery = client();
    const [first] = (await tunery.training.jobs.list({ limit: 1 })).data;
    await tunery.training.jobs.cancel(first!.id);
    const pending: string[] = [];
    for await (const job of tunery.training.jobs.list({ status: 'pending', limit: 2, offset: 1 }))
      pending.push(job.id);
    expect(pending).toHaveLength(3);
    expect(pending).not.toContain(first!.id);
  });

  it('exposes the whole body and withResponse', async () => {
    const { data: page, response } = await client().adapters.list().withResponse();
    expect(response.status).toBe(200);
    expect(page.body.current_adapter).toBeNull();
    expect(page.data).toEqual([]);
    expect(page.hasNextPage()).toBe(false);
  });

  it('stops on an empty page even if the server claims more', async () => {
    const page = new Page('jobs', { jobs: [], total: 5, has_more: true, next_cursor: 'c' }, 0, async () => {
      throw new Error('must not fetch');
    });
    const items: unknown[] = [];
    for await (const item of page) items.push(item);
    expect(items).toEqual([]);
  });
});
