// One error hierarchy. Every failure the SDK surfaces is a TuneryError; every HTTP error response
// becomes the APIError subclass that `APIError.generate` picks from its status.
import type { components } from '../generated/api.js';

type ErrorBody = components['schemas']['Error'];
type ErrorCode = components['schemas']['ErrorCode'];
type TrainingJob = components['schemas']['TrainingJob'];
type DistillationJob = components['schemas']['DistillationJob'];

/** The root of every error this SDK throws. */
export class TuneryError extends Error {
  override name = 'TuneryError';
}

/** An error answered by the server (status set), or a failure to get an answer (status undefined). */
export class APIError<TStatus extends number | undefined = number | undefined> extends TuneryError {
  override name = 'APIError';
  /** HTTP status, undefined when no response arrived. */
  readonly status: TStatus;
  /** Response headers, undefined when no response arrived. */
  readonly headers: Headers | undefined;
  /** The parsed error body (`{"error": {...}}` per the spec), or whatever the server sent. */
  readonly error: ErrorBody['error'] | undefined;
  /** Stable machine-readable code, e.g. `insufficient_credits`; undefined when no error body arrived. */
  readonly code: ErrorCode | undefined;
  /** The offending field or parameter, when the server names one. */
  readonly param: string | null | undefined;
  /** The server's `x-request-id`, for support and logs. */
  readonly requestId: string | null | undefined;

  constructor(status: TStatus, body: unknown, message: string | undefined, headers: Headers | undefined) {
    const error = errorObject(body);
    super(APIError.makeMessage(status, error, message ?? plainText(body)));
    this.status = status;
    this.headers = headers;
    this.error = error;
    this.code = error?.code;
    this.param = error?.param;
    this.requestId = headers?.get('x-request-id');
  }

  private static makeMessage(
    status: number | undefined,
    error: ErrorBody['error'] | undefined,
    message?: string,
  ) {
    const text = error?.message ?? message;
    const code = error?.code ? ` ${error.code}` : '';
    if (status && text) return `${status}${code}: ${text}`;
    if (status) return `${status}${code} status code (no body)`;
    return text ?? '(no status code or body)';
  }

  /** Maps an HTTP status to the APIError subclass for it; the one place that mapping lives. */
  static generate(
    status: number,
    body: unknown,
    message: string | undefined,
    headers: Headers,
  ): APIError<number> {
    const Class = STATUS_CLASSES[status] ?? (status >= 500 ? InternalServerError : APIError);
    return new Class(status, body, message, headers);
  }
}

/** The caller's AbortSignal fired. */
export class APIUserAbortError extends APIError<undefined> {
  override name = 'APIUserAbortError';
  constructor({ message }: { message?: string } = {}) {
    super(undefined, undefined, message ?? 'Request was aborted.', undefined);
  }
}

/** No response: DNS, refused connection, reset socket, TLS failure… */
export class APIConnectionError extends APIError<undefined> {
  override name = 'APIConnectionError';
  constructor({ message, cause }: { message?: string; cause?: unknown } = {}) {
    super(undefined, undefined, message ?? 'Connection error.', undefined);
    if (cause !== undefined) this.cause = cause;
  }
}

/** No response within the request's `timeout`. */
export class APIConnectionTimeoutError extends APIConnectionError {
  override name = 'APIConnectionTimeoutError';
  constructor({ message }: { message?: string } = {}) {
    super({ message: message ?? 'Request timed out.' });
  }
}

/** A 2xx response whose body is not JSON (a proxy's HTML page, say). Not retried. */
export class UnparsableResponseError extends APIError<number> {
  override name = 'UnparsableResponseError';
  constructor(response: Response, body: string, cause: unknown) {
    super(response.status, undefined, `Response body is not JSON: ${body.slice(0, 200)}`, response.headers);
    this.cause = cause;
  }
}

export class BadRequestError extends APIError<400> {
  override name = 'BadRequestError';
}
export class AuthenticationError extends APIError<401> {
  override name = 'AuthenticationError';
}
/** The job's estimated cost exceeds the tenant's remaining budget (`insufficient_credits`). */
export class InsufficientCreditsError extends APIError<402> {
  override name = 'InsufficientCreditsError';
}
export class PermissionDeniedError extends APIError<403> {
  override name = 'PermissionDeniedError';
}
export class NotFoundError extends APIError<404> {
  override name = 'NotFoundError';
}
export class ConflictError extends APIError<409> {
  override name = 'ConflictError';
}
export class UnprocessableEntityError extends APIError<422> {
  override name = 'UnprocessableEntityError';
}
export class RateLimitError extends APIError<429> {
  override name = 'RateLimitError';
}
export class InternalServerError extends APIError<number> {
  override name = 'InternalServerError';
}

/**
 * `waitForCompletion` gave up before the job reached a terminal status. `lastJob` is the job as last
 * seen: a training or a distillation job, told apart by `'job_id' in lastJob` (training jobs have it).
 */
export class JobWaitTimeoutError<Job = TrainingJob | DistillationJob> extends TuneryError {
  override name = 'JobWaitTimeoutError';
  constructor(
    readonly jobId: string,
    readonly timeoutMs: number,
    /** The job as last seen. */
    readonly lastJob: Job,
  ) {
    super(`Job ${jobId} did not finish within ${timeoutMs} ms.`);
  }
}

type APIErrorClass = new (
  status: number,
  body: unknown,
  message: string | undefined,
  headers: Headers,
) => APIError<number>;

const STATUS_CLASSES: Record<number, APIErrorClass | undefined> = {
  400: BadRequestError as APIErrorClass,
  401: AuthenticationError as APIErrorClass,
  402: InsufficientCreditsError as APIErrorClass,
  403: PermissionDeniedError as APIErrorClass,
  404: NotFoundError as APIErrorClass,
  409: ConflictError as APIErrorClass,
  422: UnprocessableEntityError as APIErrorClass,
  429: RateLimitError as APIErrorClass,
};

function errorObject(body: unknown): ErrorBody['error'] | undefined {
  if (body && typeof body === 'object' && 'error' in body) {
    const inner = (body as { error: unknown }).error;
    if (inner && typeof inner === 'object') return inner as ErrorBody['error'];
  }
  return undefined;
}

// A body that is not the spec's error shape (a proxy's HTML page, `{"error": "text"}`) still says something.
function plainText(body: unknown): string | undefined {
  if (typeof body === 'string' && body) return body.slice(0, 500);
  if (body && typeof body === 'object') return JSON.stringify(body).slice(0, 500);
  return undefined;
}
