import { isAbsolute, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** Server settings, all from the environment. README's configuration table lists the same variables. */
export interface Config {
  port: number;
  host: string;
  dataDir: string;
  /** Postgres URL; unset means embedded PGlite under `${dataDir}/db`. */
  databaseUrl: string | undefined;
  /** Seconds a claimed job's lease lasts without a heartbeat. */
  leaseSeconds: number;
  /** How often the sweeper rescues expired leases, ms. */
  sweepIntervalMs: number;
  /** Seconds a worker that joined a gang (num_nodes > 1) waits for the rest before giving its slot up. */
  gangWindowSeconds: number;
  /** First retry delay after a retryable failure, seconds; doubles per attempt. */
  retryBaseSeconds: number;
  /** Longest retry delay, seconds. */
  retryMaxSeconds: number;
  /** Largest JSON body accepted, bytes. */
  maxJsonBytes: number;
  /** Largest single uploaded file (dataset, artifact, checkpoint), bytes. */
  maxUploadBytes: number;
  /** Total bytes the data directory may hold; uploads beyond it are refused with 413. */
  storageQuotaBytes: number;
  /** Seconds an ordinary (non-upload) request may take to arrive whole; then 408. */
  requestTimeoutSeconds: number;
  /** Seconds an upload may go without receiving a byte before its connection is closed. */
  uploadIdleTimeoutSeconds: number;
  /** Seconds an unfinished upload is kept for resuming before the sweeper removes it. */
  uploadPartMaxAgeSeconds: number;
  /**
   * Seconds after which an idempotency key whose create never finished (the request died mid-way)
   * may be taken over by a new request with the same key.
   */
  idempotencyStaleSeconds: number;
  /** Price used for cost_accrued and budgets, USD per GPU(or CPU)-hour. */
  pricePerGpuHour: number;
  /**
   * USD per million teacher tokens (prompt and completion) of a distillation, by `teacher_model`
   * as requests write it (`openai/gpt-4o`); `*` prices every model not listed.
   */
  teacherPrices: Record<string, number>;
  logLevel: string;
  /** The folder `pnpm run docs` builds; served at /docs. */
  docsDir: string;
  /**
   * Folders (absolute, normalized) under which a `base_model` may be an absolute path on the workers.
   * Empty: absolute paths are refused, so a tenant cannot name any folder of a worker host.
   */
  modelRoots: string[];
  /** Base64 of the 32-byte key sealing job secrets; unset: `${dataDir}/secrets-key`, created once. */
  secretsKey: string | undefined;
  /** Adopt this secrets key though the database recorded another (the old one was lost). */
  secretsKeyRotate: boolean;
  /** Admin key the CLI sends to a running server; unset: `${dataDir}/admin-key`. */
  adminKey: string | undefined;
  /**
   * Hosts webhooks may reach whatever their address (`TUNERY_WEBHOOK_ALLOW_HOSTS`, comma-separated,
   * e.g. an internal service). Any other host must resolve to public addresses only.
   */
  webhookAllowHosts: string[];
  /** How often pending webhook deliveries are sent, ms. */
  webhookIntervalMs: number;
  /** First retry delay of a failed webhook delivery, seconds; doubles per attempt. */
  webhookRetryBaseSeconds: number;
  /** Bearer token `GET /metrics` requires; unset: the metrics are open (scrape them on a private network). */
  metricsToken: string | undefined;
  /** Web origins allowed to call the API from a browser (`TUNERY_CORS_ORIGINS`, comma-separated, or `*`). */
  corsOrigins: string[];
}

/** A comma-separated list, trimmed, without empty entries. */
function listEnv(name: string): string[] {
  return (process.env[name] ?? '')
    .split(',')
    .map((item) => item.trim())
    .filter(Boolean);
}

/** A non-negative number from the environment (fractions too: a price), or `fallback` when unset. */
function numberEnv(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < 0)
    throw new Error(`${name} must be a non-negative number, got "${raw}"`);
  return value;
}

/** `TUNERY_TEACHER_PRICES`: comma-separated `model=usd_per_million_tokens`, `*` for the rest. */
export function teacherPricesEnv(raw = process.env.TUNERY_TEACHER_PRICES || '*=10'): Record<string, number> {
  const prices: Record<string, number> = {};
  for (const entry of raw.split(',').filter((part) => part.trim() !== '')) {
    const eq = entry.lastIndexOf('=');
    const model = entry.slice(0, eq).trim();
    const price = Number(entry.slice(eq + 1));
    if (eq <= 0 || !model || entry.slice(eq + 1).trim() === '' || !Number.isFinite(price) || price < 0)
      throw new Error(`TUNERY_TEACHER_PRICES entries must be model=usd_per_million_tokens, got "${entry}"`);
    prices[model] = price;
  }
  return prices;
}

/** `TUNERY_MODEL_ROOTS`: colon-separated absolute folders, normalized without a trailing slash. */
function modelRootsEnv(): string[] {
  const raw = process.env.TUNERY_MODEL_ROOTS ?? '';
  return raw
    .split(':')
    .filter((part) => part !== '')
    .map((part) => {
      if (!isAbsolute(part))
        throw new Error(`TUNERY_MODEL_ROOTS entries must be absolute paths, got "${part}"`);
      return resolve(part);
    });
}

export function loadConfig(overrides: Partial<Config> = {}): Config {
  return {
    port: numberEnv('PORT', 8000),
    host: process.env.HOST ?? '127.0.0.1',
    dataDir: resolve(process.env.TUNERY_DATA_DIR ?? './data'),
    databaseUrl: process.env.DATABASE_URL || undefined,
    leaseSeconds: numberEnv('TUNERY_LEASE_SECONDS', 60),
    sweepIntervalMs: numberEnv('TUNERY_SWEEP_INTERVAL_MS', 5000),
    gangWindowSeconds: numberEnv('TUNERY_GANG_WINDOW_SECONDS', 30),
    retryBaseSeconds: numberEnv('TUNERY_RETRY_BASE_SECONDS', 10),
    retryMaxSeconds: numberEnv('TUNERY_RETRY_MAX_SECONDS', 600),
    maxJsonBytes: numberEnv('TUNERY_MAX_JSON_BYTES', 10 * 1024 * 1024),
    maxUploadBytes: numberEnv('TUNERY_MAX_UPLOAD_BYTES', 20 * 1024 * 1024 * 1024),
    storageQuotaBytes: numberEnv('TUNERY_STORAGE_QUOTA_BYTES', 0) || Number.POSITIVE_INFINITY,
    requestTimeoutSeconds: numberEnv('TUNERY_REQUEST_TIMEOUT_SECONDS', 300),
    uploadIdleTimeoutSeconds: numberEnv('TUNERY_UPLOAD_IDLE_TIMEOUT_SECONDS', 120),
    uploadPartMaxAgeSeconds: numberEnv('TUNERY_UPLOAD_PART_MAX_AGE_SECONDS', 24 * 3600),
    idempotencyStaleSeconds: numberEnv('TUNERY_IDEMPOTENCY_STALE_SECONDS', 60),
    pricePerGpuHour: numberEnv('TUNERY_PRICE_PER_GPU_HOUR', 2),
    teacherPrices: teacherPricesEnv(),
    logLevel: process.env.LOG_LEVEL ?? 'info',
    docsDir: resolve(
      process.env.TUNERY_DOCS_DIR ?? fileURLToPath(new URL('../../docs-site', import.meta.url)),
    ),
    modelRoots: modelRootsEnv(),
    secretsKey: process.env.TUNERY_SECRETS_KEY || undefined,
    secretsKeyRotate: ['1', 'true'].includes(process.env.TUNERY_SECRETS_KEY_ROTATE ?? ''),
    adminKey: process.env.TUNERY_ADMIN_KEY || undefined,
    webhookAllowHosts: listEnv('TUNERY_WEBHOOK_ALLOW_HOSTS').map((host) => host.toLowerCase()),
    webhookIntervalMs: numberEnv('TUNERY_WEBHOOK_INTERVAL_MS', 1000),
    webhookRetryBaseSeconds: numberEnv('TUNERY_WEBHOOK_RETRY_BASE_SECONDS', 10),
    metricsToken: process.env.TUNERY_METRICS_TOKEN || undefined,
    corsOrigins: listEnv('TUNERY_CORS_ORIGINS'),
    ...overrides,
  };
}
