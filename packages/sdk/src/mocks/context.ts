// What every handler module gets: the state, the router to register on, and shared helpers.

import { MockHttpError } from './errors.js';
import type { Router } from './router.js';
import type { SimulationSettings } from './simulate.js';
import type { IdempotentResult, MockState, OperationId } from './state.js';

export interface MockContext {
  state: MockState;
  router: Router;
  settings: SimulationSettings;
  /** Each GET of an unfinished job moves it one tick forward. */
  autoAdvance: boolean;
}

/**
 * `limit` (1–100, default 20) and `offset` (≥ 0, default 0) or `after`, validated as the server
 * does. The mock's cursor names the page's last item (by `id`, or `name` for named objects), so
 * that, as on the server, items created meanwhile do not shift the next page.
 */
export function pageOf<T>(
  items: readonly T[],
  url: string,
): { page: T[]; total: number; has_more: boolean; next_cursor: string | null } {
  const query = new URL(url).searchParams;
  const limit = intParam(query.get('limit'), 'limit', 20, 1, 100);
  const after = query.get('after');
  if (after !== null && query.has('offset')) {
    throw new MockHttpError(400, 'invalid_request', 'Give offset or after, not both.', 'after');
  }
  const start =
    after === null
      ? intParam(query.get('offset'), 'offset', 0, 0, Number.MAX_SAFE_INTEGER)
      : startAfter(items, after);
  const page = items.slice(start, start + limit);
  const hasMore = start + page.length < items.length;
  const last = page.at(-1);
  return {
    page,
    total: items.length,
    has_more: hasMore,
    next_cursor: hasMore && last !== undefined ? btoa(encodeURIComponent(identityOf(last))) : null,
  };
}

const identityOf = (item: unknown): string => {
  const { id, name } = item as { id?: string; name?: string };
  return String(id ?? name);
};

function startAfter(items: readonly unknown[], cursor: string): number {
  let identity: unknown;
  try {
    identity = decodeURIComponent(atob(cursor));
  } catch {
    identity = undefined;
  }
  const index = items.findIndex((item) => identityOf(item) === identity);
  if (index < 0) {
    throw new MockHttpError(
      400,
      'invalid_cursor',
      'after must be the next_cursor of a page of this list.',
      'after',
    );
  }
  return index + 1;
}

export function intParam(
  raw: string | null,
  name: string,
  fallback: number,
  min: number,
  max: number,
): number {
  if (raw === null || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new MockHttpError(
      400,
      'invalid_request',
      `request/query/${name} must be an integer in [${min}, ${max}]`,
      name,
    );
  }
  return value;
}

/** Newest first, as every list answers. */
export function newestFirst<T extends { created_at: string }>(items: Iterable<T>): T[] {
  return [...items].reverse();
}

/**
 * The idempotency rule of every creating POST: the body's `idempotency_key`, else the header. A repeat
 * with the same body returns the earlier object's id; a different body is 409 idempotency_conflict.
 */
export function idempotencyKeyOf(request: Request, body: unknown): string | undefined {
  const fromBody = (body as { idempotency_key?: unknown } | undefined)?.idempotency_key;
  if (typeof fromBody === 'string') return fromBody;
  return request.headers.get('idempotency-key') ?? undefined;
}

export function replayed(
  ctx: MockContext,
  scope: `${OperationId}${string}`,
  key: string | undefined,
  body: unknown,
): IdempotentResult | undefined {
  if (!key) return undefined;
  const earlier = ctx.state.idempotency.get(`${scope}:${key}`);
  if (!earlier) return undefined;
  if (earlier.fingerprint !== fingerprint(body)) {
    throw new MockHttpError(
      409,
      'idempotency_conflict',
      `Idempotency key ${key} was used with a different request body.`,
      'idempotency_key',
    );
  }
  return earlier;
}

export function remember(
  ctx: MockContext,
  scope: `${OperationId}${string}`,
  key: string | undefined,
  body: unknown,
  result: Omit<IdempotentResult, 'fingerprint'>,
) {
  if (key) ctx.state.idempotency.set(`${scope}:${key}`, { ...result, fingerprint: fingerprint(body) });
}

/** Key-order-independent JSON, without the idempotency key itself. */
export function fingerprint(value: unknown): string {
  const canonical = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(canonical);
    if (v && typeof v === 'object') {
      return Object.fromEntries(
        Object.entries(v)
          .filter(([k]) => k !== 'idempotency_key')
          .sort(([a], [b]) => a.localeCompare(b))
          .map(([k, inner]) => [k, canonical(inner)]),
      );
    }
    return v;
  };
  return JSON.stringify(canonical(value ?? null));
}

/** Reads a JSON body that may be absent (operations whose requestBody is optional). */
export async function optionalJson<T>(request: Request): Promise<T | undefined> {
  const text = await request.text();
  if (!text) return undefined;
  try {
    return JSON.parse(text) as T;
  } catch {
    throw new MockHttpError(400, 'invalid_request', 'The request body is not valid JSON.');
  }
}

/** For `request.json().catch(badJson)`: a body that is not JSON is a 400, as on the server. */
export function badJson(): never {
  throw new MockHttpError(400, 'invalid_request', 'The request body is not valid JSON.');
}
