// Pagination over the spec's list envelope `{"<plural>": [...], "total", "has_more", "next_cursor"}`:
// the first page where the caller asked (`offset` or `after`), every next one by its cursor, so that a
// walk over a list that grows meanwhile neither repeats an item nor skips one.
import { APIPromise, type WithResponse } from './api-promise.js';

/** The envelope every list operation answers. */
export type ListEnvelope<K extends string, Item> = { [key in K]: Item[] } & {
  total: number;
  has_more: boolean;
  next_cursor: string | null;
};

/** Where a page starts: `offset` items in, or after the page whose `next_cursor` this is. */
export type PagePosition = { offset: number } | { after: string };

/** Fetches the page that starts at `position`. */
export type PageFetcher<Body> = (position: PagePosition) => Promise<WithResponse<Body>>;

/**
 * One page of a list. `data` holds its items; `for await (const item of page)` walks this page and
 * every page after it.
 */
export class Page<K extends string, Item, Body extends ListEnvelope<K, Item> = ListEnvelope<K, Item>>
  implements AsyncIterable<Item>
{
  /** This page's items. */
  readonly data: Item[];
  /** Matching items in all pages. */
  readonly total: number;
  /** The server says more pages follow. */
  readonly hasMore: boolean;
  /** The whole response body (some lists carry more, e.g. adapters' `current_adapter`). */
  readonly body: Body;

  constructor(
    private readonly key: K,
    body: Body,
    /** Items before this page's first one, when the walk started at an offset. */
    readonly offset: number,
    private readonly fetchPage: PageFetcher<Body>,
  ) {
    this.body = body;
    this.data = body[key] as Item[];
    this.total = body.total;
    this.hasMore = body.has_more;
  }

  hasNextPage(): boolean {
    // An empty page cannot advance; stop rather than loop.
    return this.hasMore && this.data.length > 0;
  }

  /** Where the next page starts: after this one's cursor (or, from a server without one, its offset). */
  nextPosition(): PagePosition {
    const cursor = this.body.next_cursor;
    return cursor ? { after: cursor } : { offset: this.offset + this.data.length };
  }

  async getNextPage(): Promise<Page<K, Item, Body>> {
    if (!this.hasNextPage()) throw new Error('No next page; check hasNextPage() first.');
    const { data } = await this.fetchPage(this.nextPosition());
    return new Page(this.key, data, this.offset + this.data.length, this.fetchPage);
  }

  /** This page and every page after it. */
  async *iterPages(): AsyncGenerator<Page<K, Item, Body>> {
    let page: Page<K, Item, Body> = this;
    yield page;
    while (page.hasNextPage()) {
      page = await page.getNextPage();
      yield page;
    }
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Item> {
    for await (const page of this.iterPages()) yield* page.data;
  }
}

/**
 * What a list method returns: `await` it for the first Page, or `for await` over it for every item
 * of every page.
 */
export class PagePromise<K extends string, Item, Body extends ListEnvelope<K, Item> = ListEnvelope<K, Item>>
  extends APIPromise<Page<K, Item, Body>>
  implements AsyncIterable<Item>
{
  constructor(key: K, first: PagePosition, fetchPage: PageFetcher<Body>) {
    super(
      fetchPage(first).then(({ data, response, requestId }) => ({
        data: new Page<K, Item, Body>(key, data, 'offset' in first ? first.offset : 0, fetchPage),
        response,
        requestId,
      })),
    );
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Item> {
    const page = await this;
    yield* page;
  }
}

/**
 * What the job-timeline reads return (logs, metrics, events, checkpoints, outputs): `await` it for
 * the answer as the server sent it, or `for await` over it for every item, the reads that follow
 * fetched as it goes (logs, metrics and events after the last item seen) until there is no more.
 */
export class ItemsPromise<Body, Item> extends APIPromise<Body> implements AsyncIterable<Item> {
  constructor(
    first: APIPromise<Body>,
    /** Every item from the first answer on, each walk with its own state. */
    private readonly walk: (first: Body) => AsyncIterable<Item>,
  ) {
    super(first.withResponse());
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Item> {
    yield* this.walk(await this);
  }
}
