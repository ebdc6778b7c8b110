import { describe, expect, it } from 'vitest';
import {
  APIConnectionError,
  APIConnectionTimeoutError,
  APIError,
  APIUserAbortError,
  AuthenticationError,
  BadRequestError,
  ConflictError,
  InsufficientCreditsError,
  InternalServerError,
  NotFoundError,
  PermissionDeniedError,
  RateLimitError,
  TuneryError,
  UnprocessableEntityError,
} from '../../src/index.js';

const body = (code: string, message = 'Something.', param: string | null = null) => ({
  error: { code, message, param },
});

describe('APIError.generate', () => {
  it.each([
    [400, BadRequestError],
    [401, AuthenticationError],
    [402, InsufficientCreditsError],
    [403, PermissionDeniedError],
    [404, NotFoundError],
    [409, ConflictError],
    [422, UnprocessableEntityError],
    [429, RateLimitError],
    [500, InternalServerError],
    [502, InternalServerError],
    [503, InternalServerError],
  ])('maps %i to %o', (status, Class) => {
    const error = APIError.generate(status, body('x'), undefined, new Headers());
    expect(error).toBeInstanceOf(Class);
    expect(error).toBeInstanceOf(APIError);
    expect(error).toBeInstanceOf(TuneryError);
    expect(error.status).toBe(status);
  });

  it('falls back to APIError for other statuses', () => {
    const error = APIError.generate(413, body('payload_too_large'), undefined, new Headers());
    expect(error.constructor).toBe(APIError);
    expect(error.code).toBe('payload_too_large');
  });

  it('carries code, param, message, request id, headers and the error body', () => {
    const headers = new Headers({ 'x-request-id': 'req_123' });
    const error = APIError.generate(
      402,
      body('insufficient_credits', 'Estimated cost $4.20 exceeds the $1.00 left in your budget.'),
      undefined,
      headers,
    );
    expect(error).toMatchObject({
      status: 402,
      code: 'insufficient_credits',
      param: null,
      requestId: 'req_123',
      error: { code: 'insufficient_credits' },
      name: 'InsufficientCreditsError',
    });
    expect(error.headers).toBe(headers);
    expect(error.message).toBe(
      '402 insufficient_credits: Estimated cost $4.20 exceeds the $1.00 left in your budget.',
    );
  });

  it('keeps a body that is not the spec shape in the message', () => {
    const error = APIError.generate(502, '<html>Bad gateway</html>', undefined, new Headers());
    expect(error.code).toBeUndefined();
    expect(error.message).toContain('Bad gateway');
    expect(APIError.generate(500, undefined, undefined, new Headers()).message).toBe(
      '500 status code (no body)',
    );
  });
});

describe('errors without a response', () => {
  it('have no status and sit in the hierarchy', () => {
    const cause = new TypeError('fetch failed');
    const connection = new APIConnectionError({ cause });
    expect(connection.status).toBeUndefined();
    expect(connection.cause).toBe(cause);
    expect(new APIConnectionTimeoutError()).toBeInstanceOf(APIConnectionError);
    expect(new APIUserAbortError()).toBeInstanceOf(APIError);
    expect(new APIUserAbortError().message).toBe('Request was aborted.');
  });
});
