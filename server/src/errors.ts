import type { components } from './generated/api.js';
import { loadSpec } from './spec.js';

/** A code the spec lists; the compiler refuses any other, so the SDK's union stays complete. */
export type ErrorCode = components['schemas']['ErrorCode'];

/**
 * The one error type route code throws. The error handler in app.ts turns it (and the validator's
 * errors) into the spec's `{"error": {"code", "message", "param"}}`.
 */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: ErrorCode,
    message: string,
    readonly param: string | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

/** An error in express-openapi-validator's shape (or a database's), which app.ts's error handler maps. */
export interface ValidatorError {
  status?: number;
  statusCode?: number;
  type?: string;
  message?: string;
  /** Postgres SQLSTATE, on database errors. */
  code?: string;
  errors?: { path?: string; message?: string; errorCode?: string }[];
  /** Headers the validator wants on its answer (`Allow` on a 405). */
  headers?: Record<string, string>;
}

export const badRequest = (
  message: string,
  param: string | null = null,
  code: ErrorCode = 'invalid_request',
) => new ApiError(400, code, message, param);
export const invalidConfig = (message: string, param: string | null = null) =>
  new ApiError(400, 'invalid_config', message, param);
export const notFound = (
  what: string,
  id: string,
  param: string | null = null,
  code: ErrorCode = 'not_found',
) => new ApiError(404, code, `No ${what} ${id}.`, param);
export const conflict = (message: string, code: ErrorCode = 'conflict', param: string | null = null) =>
  new ApiError(409, code, message, param);
export const forbidden = (message: string, param: string | null = null) =>
  new ApiError(403, 'permission_denied', message, param);
export const leaseLost = (jobId: string) =>
  new ApiError(409, 'lease_lost', `The lease on ${jobId} is no longer yours; drop the job.`, 'lease_token');

const ERROR_CODES: ReadonlySet<string> = new Set(loadSpec().components.schemas.ErrorCode.enum);

/** A code that came from outside the type system (a worker's report) if the spec lists it, else `fallback`. */
export const knownErrorCode = (code: string, fallback: ErrorCode): ErrorCode =>
  ERROR_CODES.has(code) ? (code as ErrorCode) : fallback;
