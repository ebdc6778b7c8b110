/**
 * One page of a list route: the count, the ordered page, the views, the envelope, and the cursor
 * that continues it.
 *
 * A list pages by `offset` or by `after`, the opaque `next_cursor` of the page before. The cursor
 * holds the sort keys of that page's last row, and the next page is the rows that sort after them
 * (keyset pagination): rows created or deleted meanwhile neither repeat an item nor skip one, as
 * shifting offsets would.
 */
import type { Knex } from 'knex';
import { badRequest } from '../errors.js';

/**
 * One sort key: an SQL expression over the listed table that yields an integer or text, and its
 * direction. A list's keys end with a unique one, so that they order every row.
 */
export interface SortKey {
  sql: string;
  order: 'asc' | 'desc';
  kind: 'integer' | 'text';
}

/** `created_at` to the microsecond, as an integer, so that a cursor carries it exactly. */
export const CREATED_AT_MICROS = '(extract(epoch from created_at) * 1000000)::bigint';

/** Newest first; `tieBreaker` (unique) orders rows created in the same instant. */
export const newestFirst = (
  tieBreaker: { column: string; order: 'asc' | 'desc' } = { column: 'id', order: 'desc' },
): SortKey[] => [
  { sql: CREATED_AT_MICROS, order: 'desc', kind: 'integer' },
  { sql: tieBreaker.column, order: tieBreaker.order, kind: 'text' },
];

/** Where the caller starts: `offset` rows in, or after the row a `next_cursor` names. */
export type Paging = { limit: number; offset: number; after?: string };

/**
 * The list envelope of one page of `visible` (a query already filtered to what the caller may see):
 * the total counts every visible row, the page is sorted by `keys` and cut at `paging`, and `views`
 * turns the page's rows into what the API shows (all at once, so that it can batch its lookups).
 */
export async function listPage<K extends string, View, Row = Record<string, unknown>>(
  key: K,
  visible: Knex.QueryBuilder,
  paging: Paging,
  keys: SortKey[],
  views: (rows: Row[]) => View[] | Promise<View[]>,
) {
  const counted = await visible.clone().clearSelect().clearOrder().count({ count: '*' }).first();
  const query = visible.clone();
  if (paging.after !== undefined) whereAfter(query, keys, decodeCursor(paging.after, keys));
  else query.offset(paging.offset);
  for (const k of keys) query.orderByRaw(`${k.sql} ${k.order}`);
  if (!selectsColumns(query)) query.select('*');
  // One row past the page says whether another page follows.
  const rows = (await query.select(sortKeyColumns(query, keys)).limit(paging.limit + 1)) as Row[];
  const hasMore = rows.length > paging.limit;
  const pageRows = rows.slice(0, paging.limit);
  const last = pageRows.at(-1) as Record<string, unknown> | undefined;
  return {
    [key]: await views(pageRows),
    total: Number(counted?.count ?? 0),
    has_more: hasMore,
    next_cursor: hasMore && last ? encodeCursor(keys.map((_, i) => String(last[sortKeyAlias(i)]))) : null,
  } as { [P in K]: View[] } & { total: number; has_more: boolean; next_cursor: string | null };
}

/** `next_cursor` of a page whose last item has these sort-key values (also used by hand-built lists). */
export function encodeCursor(values: string[]): string {
  return Buffer.from(JSON.stringify(values)).toString('base64url');
}

/** The values a `next_cursor` holds (strings); anything else is a 400. */
export function cursorValues(cursor: string): string[] {
  let values: unknown;
  try {
    values = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8'));
  } catch {
    values = undefined;
  }
  const strings = Array.isArray(values) && values.every((v) => typeof v === 'string' && v.length <= 512);
  if (!strings || (values as string[]).length === 0) throw invalidCursor();
  return values as string[];
}

/** The sort-key values a cursor holds, checked against `keys`: a cursor from another list is a 400. */
function decodeCursor(cursor: string, keys: Pick<SortKey, 'kind'>[]): string[] {
  const values = cursorValues(cursor);
  const fits =
    values.length === keys.length &&
    values.every((v, i) => keys[i]?.kind === 'text' || /^-?\d{1,18}$/.test(v));
  if (!fits) throw invalidCursor();
  return values;
}

const invalidCursor = () =>
  badRequest('after must be the next_cursor of a page of this list.', 'after', 'invalid_cursor');

const sortKeyAlias = (i: number) => `__sort_key_${i}`;

/** Whether the caller chose the columns (otherwise the page selects every column). */
const selectsColumns = (query: Knex.QueryBuilder) =>
  (query as unknown as { _statements: { grouping: string }[] })._statements.some(
    (s) => s.grouping === 'columns',
  );

/** Each sort key as text, beside the page's columns (so that integers reach the cursor exactly). */
function sortKeyColumns(query: Knex.QueryBuilder, keys: SortKey[]): Knex.Raw[] {
  return keys.map((k, i) => query.client.raw(`${k.sql}::text as ${sortKeyAlias(i)}`));
}

/**
 * Rows that sort strictly after `values`: the first key past its value, or equal to it and the
 * second key past, and so on (a lexicographic comparison that respects each key's direction).
 */
function whereAfter(query: Knex.QueryBuilder, keys: SortKey[], values: string[]): void {
  const cast = (k: SortKey) => (k.kind === 'integer' ? '?::bigint' : '?');
  const clauses: string[] = [];
  const bindings: string[] = [];
  keys.forEach((k, i) => {
    const equal = keys.slice(0, i).map((e) => `${e.sql} = ${cast(e)}`);
    clauses.push([...equal, `${k.sql} ${k.order === 'asc' ? '>' : '<'} ${cast(k)}`].join(' and '));
    bindings.push(...values.slice(0, i + 1));
  });
  query.whereRaw(`(${clauses.map((c) => `(${c})`).join(' or ')})`, bindings);
}
