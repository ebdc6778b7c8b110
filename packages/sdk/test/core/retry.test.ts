import { afterEach, describe, expect, it, vi } from 'vitest';
import {
  MAX_RETRY_DELAY_MS,
  retryAfterMs,
  retryDelayMs,
  shouldRetry,
  TRANSIENT_CONFLICT_CODES,
} from '../../src/core/retry.js';

const headers = (init: Record<string, string> = {}) => new Headers(init);

describe('shouldRetry', () => {
  it.each([
    [undefined, undefined, true],
    [408, 'request_timeout', true],
    [429, 'rate_limited', true],
    [500, 'internal_error', true],
    [502, undefined, true],
    [503, 'service_unavailable', true],
    [400, 'invalid_request', false],
    [401, 'unauthorized', false],
    [402, 'insufficient_credits', false],
    [404, 'job_not_found', false],
    [409, 'idempotency_conflict', false],
    [409, 'job_already_running', false],
    [409, 'job_already_finished', false],
    [409, 'job_not_resumable', false],
    [409, 'lease_lost', false],
    [409, 'conflict', false],
    [409, 'request_in_progress', true],
    [409, undefined, false],
  ])('status %s code %s → %s', (status, code, expected) => {
    expect(shouldRetry({ status, code, headers: headers() })).toBe(expected);
  });

  it('lets x-should-retry override the status rules', () => {
    expect(
      shouldRetry({ status: 400, code: 'invalid_request', headers: headers({ 'x-should-retry': 'true' }) }),
    ).toBe(true);
    expect(
      shouldRetry({ status: 503, code: undefined, headers: headers({ 'x-should-retry': 'false' }) }),
    ).toBe(false);
  });

  it('retries only a conflict that a concurrent request will resolve', () => {
    expect([...TRANSIENT_CONFLICT_CODES].sort()).toEqual(['request_in_progress']);
  });
});

describe('retryAfterMs', () => {
  it('reads retry-after-ms first, then Retry-After seconds or an HTTP date', () => {
    expect(retryAfterMs(headers({ 'retry-after-ms': '250', 'retry-after': '9' }))).toBe(250);
    expect(retryAfterMs(headers({ 'retry-after': '2' }))).toBe(2000);
    expect(retryAfterMs(headers({ 'retry-after': '1.5' }))).toBe(1500);
    const now = Date.parse('2026-04-19T12:00:00Z');
    expect(retryAfterMs(headers({ 'retry-after': 'Sun, 19 Apr 2026 12:00:03 GMT' }), now)).toBe(3000);
    expect(retryAfterMs(headers({ 'retry-after': 'Sun, 19 Apr 2026 11:00:00 GMT' }), now)).toBe(0);
    expect(retryAfterMs(headers({ 'retry-after': 'soon' }))).toBeUndefined();
    expect(retryAfterMs(headers())).toBeUndefined();
    expect(retryAfterMs(undefined)).toBeUndefined();
  });
});

describe('retryDelayMs', () => {
  afterEach(() => vi.restoreAllMocks());

  it('honours a sane server delay exactly', () => {
    expect(retryDelayMs(0, headers({ 'retry-after': '1' }))).toBe(1000);
    expect(retryDelayMs(3, headers({ 'retry-after-ms': '0' }))).toBe(0);
  });

  it('backs off 0.5 s · 2ⁿ, capped at 8 s, less up to 25% jitter', () => {
    vi.spyOn(Math, 'random').mockReturnValue(0);
    expect([0, 1, 2, 3, 4, 5, 10].map((n) => retryDelayMs(n, headers()))).toEqual([
      500, 1000, 2000, 4000, 8000, 8000, 8000,
    ]);
    vi.spyOn(Math, 'random').mockReturnValue(0.999);
    expect(retryDelayMs(0, headers())).toBeCloseTo(375, 0);
    expect(retryDelayMs(9, headers())).toBeLessThanOrEqual(MAX_RETRY_DELAY_MS);
  });

  it('ignores a server delay over a minute or below zero', () => {
    vi.spyOn(Math, 'random').mockReturnValue(0);
    expect(retryDelayMs(1, headers({ 'retry-after': '3600' }))).toBe(1000);
    expect(retryDelayMs(1, headers({ 'retry-after-ms': '-5' }))).toBe(1000);
  });
});
