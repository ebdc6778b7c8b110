export type { Middleware } from 'openapi-fetch';
export { Tunery, Tunery as default } from './client.js';
export { APIPromise, type WithResponse } from './core/api-promise.js';
export {
  type CallOptions,
  type ClientOptions,
  DEFAULT_BASE_URL,
  DEFAULT_MAX_RETRIES,
  DEFAULT_TIMEOUT_MS,
  type Fetch,
  type HeadersRecord,
  type RequestOptions,
  TuneryClient,
} from './core/client.js';
export {
  APIConnectionError,
  APIConnectionTimeoutError,
  APIError,
  APIUserAbortError,
  AuthenticationError,
  BadRequestError,
  ConflictError,
  InsufficientCreditsError,
  InternalServerError,
  JobWaitTimeoutError,
  NotFoundError,
  PermissionDeniedError,
  RateLimitError,
  TuneryError,
  UnparsableResponseError,
  UnprocessableEntityError,
} from './core/error.js';
export type { FollowOptions } from './core/follow.js';
export { IDEMPOTENT_POST_PATHS } from './core/idempotency.js';
export type { Logger, LogLevel } from './core/log.js';
export { ItemsPromise, type ListEnvelope, Page, PagePromise } from './core/pagination.js';
export { isTerminal, TERMINAL_STATUSES, type WaitOptions } from './core/polling.js';
export { retryAfterMs, retryDelayMs, shouldRetry, TRANSIENT_CONFLICT_CODES } from './core/retry.js';
export type { JobStreamMessage, JobStreamOptions, JobStreamSource } from './core/stream.js';
export { FileReadError, type ToFileInput, toFile, type Uploadable } from './core/uploads.js';
export type { components, operations, paths } from './generated/api.js';
export { Adapters } from './resources/adapters.js';
export { Admin, ApiKeys } from './resources/admin.js';
export { BudgetResource } from './resources/budget.js';
export { Chat, ChatCompletions } from './resources/chat.js';
export { Datasets, type DatasetUploadParams } from './resources/datasets.js';
export { Distiller } from './resources/distillation.js';
export type { DownloadOptions } from './resources/downloads.js';
export { BaseModels, Models } from './resources/models.js';
export { AutoConfig } from './resources/training/auto-config.js';
export { Jobs } from './resources/training/jobs.js';
export { Templates } from './resources/training/templates.js';
export { Trainer } from './resources/training/trainer.js';
export { Trajectories } from './resources/trajectories.js';
export { Webhooks } from './resources/webhooks.js';
export type * from './types.js';
export { type VerifyWebhookOptions, verifyWebhookSignature } from './webhook-signature.js';
