import type { EventEmitter } from 'node:events';
import type { Knex } from 'knex';
import type { Logger } from 'pino';
import type { Config } from './config.js';
import type { DatabaseKind } from './db.js';
import type { Metrics } from './metrics.js';
import type { SecretBox } from './secrets.js';
import type { LocalStorage } from './storage.js';

/** Everything a route handler may use, built once at start-up (see server.ts). */
export interface AppContext {
  knex: Knex;
  dbKind: DatabaseKind;
  config: Config;
  storage: LocalStorage;
  logger: Logger;
  /** Seals job secrets at rest and opens them for the claim answer. */
  secretBox: SecretBox;
  /** Emits 'job-available' when a job becomes claimable; long-polling claims wait on it. */
  queueSignal: EventEmitter;
  /** Set when the server is shutting down: long-polls return at once. */
  shuttingDown: AbortController;
  /** The operator's metrics (`GET /metrics`). */
  metrics: Metrics;
}
