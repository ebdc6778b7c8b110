/** One page of a list route: the count, the ordered page, the views, the envelope. */
import type { Knex } from 'knex';
import { listEnvelope } from '../http.js';

/** Orders a page's query (knex `orderBy` / `orderByRaw` calls). */
export type Ordering = (query: Knex.QueryBuilder) => Knex.QueryBuilder;

/**
 * Newest first; `tieBreaker` orders rows created in the same instant, so that pages neither
 * overlap nor skip.
 */
export const newestFirst =
  (tieBreaker: { column: string; order: 'asc' | 'desc' } = { column: 'id', order: 'desc' }): Ordering =>
  (query) =>
    query.orderBy([{ column: 'created_at', order: 'desc' }, tieBreaker]);

/**
 * The list envelope of one page of `visible` (a query already filtered to what the caller may see):
 * the total counts every visible row (selected columns and any ordering left out), the page is
 * `order`ed and cut at `paging`, and `views` turns the page's rows into what the API shows (all
 * at once, so that it can batch its own lookups).
 */
export async function listPage<K extends string, View, Row = Record<string, unknown>>(
  key: K,
  visible: Knex.QueryBuilder,
  paging: { limit: number; offset: number },
  order: Ordering,
  views: (rows: Row[]) => View[] | Promise<View[]>,
) {
  const counted = await visible.clone().clearSelect().clearOrder().count({ count: '*' }).first();
  const rows = (await order(visible.clone()).limit(paging.limit).offset(paging.offset)) as Row[];
  return listEnvelope(key, await views(rows), Number(counted?.count ?? 0), paging.offset);
}
