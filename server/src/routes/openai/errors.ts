/**
 * Errors under `/openai/v1` in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
 * The status stays Tunery's, so the OpenAI clients raise their typed errors (BadRequestError for
 * 400, AuthenticationError for 401, NotFoundError for 404…); `code` keeps Tunery's stable code.
 * app.ts mounts the error handler with this body for the prefix.
 */
import type { ApiError } from '../../errors.js';

/** Where the OpenAI-compatible routes live. */
export const OPENAI_PREFIX = '/openai/v1';

/** OpenAI's `error.type` for an HTTP status. */
export function openAIErrorType(status: number): string {
  if (status === 401) return 'authentication_error';
  if (status === 402) return 'insufficient_quota';
  if (status === 403) return 'permission_error';
  if (status === 404) return 'not_found_error';
  if (status === 409) return 'conflict_error';
  if (status === 429) return 'rate_limit_error';
  if (status >= 500) return 'server_error';
  return 'invalid_request_error';
}

export function openAIErrorBody(error: ApiError): string {
  return JSON.stringify({
    error: {
      message: error.message,
      type: openAIErrorType(error.status),
      param: error.param,
      code: error.code,
    },
  });
}
