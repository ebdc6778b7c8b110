// When a failed attempt is tried again, and how long to wait first.
import type { components } from '../generated/api.js';

type ErrorCode = components['schemas']['ErrorCode'];

/** What a retry rule looks at. `status` is undefined for connection errors and timeouts. */
export interface RetryContext {
  status: number | undefined;
  code: string | undefined;
  headers: Headers | undefined;
}

/**
 * 409 codes that mean "a concurrent request holds this idempotency key and will answer soon". A 409 with any
 * other code (`idempotency_conflict`, `job_already_finished`, `job_already_running`,
 * `job_not_resumable`, `conflict`, `lease_lost` — a stale lease never becomes valid again) is a real
 * conflict and is not retried.
 */
export const TRANSIENT_CONFLICT_CODES: ReadonlySet<ErrorCode> = new Set<ErrorCode>(['request_in_progress']);

type RetryRule = (ctx: RetryContext) => boolean | undefined;

// The first rule that answers true or false decides; undefined passes to the next rule.
const RETRY_RULES: readonly RetryRule[] = [
  // The server said so explicitly.
  ({ headers }) => booleanHeader(headers?.get('x-should-retry')),
  // No response at all (refused, reset, timed out): the request may never have arrived.
  ({ status }) => (status === undefined ? true : undefined),
  // The server gave up waiting for the request body.
  ({ status }) => (status === 408 ? true : undefined),
  // A concurrent request with the same key will answer soon; any other conflict will not go away.
  ({ status, code }) =>
    status === 409 ? code !== undefined && TRANSIENT_CONFLICT_CODES.has(code as ErrorCode) : undefined,
  // Rate limited: wait (Retry-After) and try again.
  ({ status }) => (status === 429 ? true : undefined),
  // The server failed; the request is safe to repeat (creates carry an Idempotency-Key).
  ({ status }) => (status !== undefined && status >= 500 ? true : undefined),
];

/** Whether a failed attempt should be tried again (when retries are left). */
export function shouldRetry(ctx: RetryContext): boolean {
  for (const rule of RETRY_RULES) {
    const verdict = rule(ctx);
    if (verdict !== undefined) return verdict;
  }
  return false;
}

export const INITIAL_RETRY_DELAY_MS = 500;
export const MAX_RETRY_DELAY_MS = 8_000;
/** A server-given delay longer than this is ignored in favour of our own backoff. */
export const MAX_RETRY_AFTER_MS = 60_000;

/**
 * Milliseconds to wait before retry number `retryIndex` (0 for the first retry): the server's
 * `retry-after-ms` or `Retry-After` (seconds or an HTTP date) when it gives a sane one, else
 * 0.5 s · 2ⁿ capped at 8 s, less up to 25% jitter so that many clients do not retry in step.
 */
export function retryDelayMs(retryIndex: number, headers: Headers | undefined, now = Date.now()): number {
  const serverDelay = retryAfterMs(headers, now);
  if (serverDelay !== undefined && serverDelay >= 0 && serverDelay <= MAX_RETRY_AFTER_MS) return serverDelay;
  const backoff = Math.min(INITIAL_RETRY_DELAY_MS * 2 ** retryIndex, MAX_RETRY_DELAY_MS);
  const jitter = 1 - Math.random() * 0.25;
  return backoff * jitter;
}

/** The delay the server asked for, in ms, or undefined when it asked for none (or nonsense). */
export function retryAfterMs(headers: Headers | undefined, now = Date.now()): number | undefined {
  const ms = headers?.get('retry-after-ms');
  if (ms) {
    const value = Number.parseFloat(ms);
    if (!Number.isNaN(value)) return value;
  }
  const after = headers?.get('retry-after');
  if (!after) return undefined;
  if (/^\s*\d+(\.\d+)?\s*$/.test(after)) return Number.parseFloat(after) * 1000;
  const date = Date.parse(after);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}

function booleanHeader(value: string | null | undefined): boolean | undefined {
  if (value === 'true') return true;
  if (value === 'false') return false;
  return undefined;
}
