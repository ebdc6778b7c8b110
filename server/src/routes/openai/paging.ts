/**
 * OpenAI's cursor pages: newest first, `after` = the id of the previous page's last object,
 * `{"object": "list", "data", "has_more"}`.
 */
import type { Knex } from 'knex';
import { badRequest } from '../../errors.js';

export interface CursorPage<T> {
  object: 'list';
  data: T[];
  has_more: boolean;
}

/** One more row than the page holds tells whether there is another page. */
export function cursorPage<Row, T>(rows: Row[], limit: number, view: (row: Row) => T): CursorPage<T> {
  return { object: 'list', data: rows.slice(0, limit).map(view), has_more: rows.length > limit };
}

/**
 * Rows of `visible` (already scoped to the caller) by (created_at, id), newest first unless
 * `order` is asc, after the row whose id is `after`; limit + 1 of them, for `cursorPage`.
 */
export async function rowsAfter(
  visible: Knex.QueryBuilder,
  after: string | undefined,
  limit: number,
  order: 'asc' | 'desc' = 'desc',
): Promise<Record<string, unknown>[]> {
  const past = order === 'desc' ? '<' : '>';
  const query = visible.clone().orderBy([
    { column: 'created_at', order },
    { column: 'id', order },
  ]);
  if (after !== undefined) {
    const anchor = await visible.clone().where('id', after).first('id', 'created_at');
    if (!anchor) throw badRequest(`No object ${after} to page after.`, 'after');
    query.where((q) =>
      q
        .where('created_at', past, anchor.created_at)
        .orWhere((same) => same.where('created_at', anchor.created_at).andWhere('id', past, anchor.id)),
    );
  }
  return query.limit(limit + 1);
}

/** The number after the last `-` of an id such as `ftevent-job_x-12`; for `after` on ordered rows. */
export function trailingNumber(id: string | undefined, prefix: string): number | undefined {
  if (id === undefined) return undefined;
  const match = id.startsWith(prefix) ? /-(\d+)$/.exec(id) : null;
  if (!match) throw badRequest(`No object ${id} to page after.`, 'after');
  return Number(match[1]);
}

/** Unix seconds, as OpenAI's objects carry time. */
export const unixSeconds = (value: Date | string): number => Math.floor(new Date(value).getTime() / 1000);
