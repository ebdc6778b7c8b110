// Errors a mock handler throws; the router turns them into spec-shaped responses.
import { HttpResponse } from 'msw';

/** An API error: `{"error": {"code", "message", "param"}}` with `status`. */
export class MockHttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly param: string | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }

  toResponse(): Response {
    const body = { error: { code: this.code, message: this.message, param: this.param } };
    return HttpResponse.json(body, { status: this.status, headers: this.headers });
  }
}

/** Default error codes for statuses a test injects without naming one. */
export const DEFAULT_ERROR_CODES: Record<number, string> = {
  400: 'invalid_request',
  401: 'unauthorized',
  402: 'insufficient_credits',
  403: 'permission_denied',
  404: 'not_found',
  408: 'request_timeout',
  409: 'conflict',
  413: 'payload_too_large',
  416: 'range_not_satisfiable',
  429: 'rate_limited',
  500: 'internal_error',
  502: 'bad_gateway',
  503: 'service_unavailable',
};

export const notFound = (what: string, id: string, param: string, code = 'not_found') =>
  new MockHttpError(404, code, `No ${what} ${id}.`, param);
