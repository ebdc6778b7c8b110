/**
 * The one error type route code throws. The error handler in app.ts turns it (and the validator's
 * errors) into the spec's `{"error": {"code", "message", "param"}}`.
 */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly param: string | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

export const badRequest = (message: string, param: string | null = null, code = 'invalid_request') =>
  new ApiError(400, code, message, param);
export const invalidConfig = (message: string, param: string | null = null) =>
  new ApiError(400, 'invalid_config', message, param);
export const notFound = (what: string, id: string, param: string | null = null, code = 'not_found') =>
  new ApiError(404, code, `No ${what} ${id}.`, param);
export const conflict = (message: string, code = 'conflict', param: string | null = null) =>
  new ApiError(409, code, message, param);
export const forbidden = (message: string, param: string | null = null) =>
  new ApiError(403, 'permission_denied', message, param);
export const leaseLost = (jobId: string) =>
  new ApiError(409, 'lease_lost', `The lease on ${jobId} is no longer yours; drop the job.`, 'lease_token');
