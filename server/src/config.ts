import { resolve } from 'node:path';
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
  /** Price used for cost_accrued and budgets, USD per GPU(or CPU)-hour. */
  pricePerGpuHour: number;
  logLevel: string;
  /** The folder `pnpm docs` builds; served at /docs. */
  docsDir: string;
  /** Base64 of the 32-byte key sealing job secrets; unset: `${dataDir}/secrets-key`, created once. */
  secretsKey: string | undefined;
  /** Adopt this secrets key though the database recorded another (the old one was lost). */
  secretsKeyRotate: boolean;
  /** Admin key the CLI sends to a running server; unset: `${dataDir}/admin-key`. */
  adminKey: string | undefined;
}

function intEnv(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < 0)
    throw new Error(`${name} must be a non-negative number, got "${raw}"`);
  return value;
}

export function loadConfig(overrides: Partial<Config> = {}): Config {
  return {
    port: intEnv('PORT', 8000),
    host: process.env.HOST ?? '127.0.0.1',
    dataDir: resolve(process.env.TUNERY_DATA_DIR ?? './data'),
    databaseUrl: process.env.DATABASE_URL || undefined,
    leaseSeconds: intEnv('TUNERY_LEASE_SECONDS', 60),
    sweepIntervalMs: intEnv('TUNERY_SWEEP_INTERVAL_MS', 5000),
    retryBaseSeconds: intEnv('TUNERY_RETRY_BASE_SECONDS', 10),
    retryMaxSeconds: intEnv('TUNERY_RETRY_MAX_SECONDS', 600),
    maxJsonBytes: intEnv('TUNERY_MAX_JSON_BYTES', 10 * 1024 * 1024),
    maxUploadBytes: intEnv('TUNERY_MAX_UPLOAD_BYTES', 20 * 1024 * 1024 * 1024),
    storageQuotaBytes: intEnv('TUNERY_STORAGE_QUOTA_BYTES', 0) || Number.POSITIVE_INFINITY,
    pricePerGpuHour: intEnv('TUNERY_PRICE_PER_GPU_HOUR', 2),
    logLevel: process.env.LOG_LEVEL ?? 'info',
    docsDir: resolve(
      process.env.TUNERY_DOCS_DIR ?? fileURLToPath(new URL('../../docs-site', import.meta.url)),
    ),
    secretsKey: process.env.TUNERY_SECRETS_KEY || undefined,
    secretsKeyRotate: ['1', 'true'].includes(process.env.TUNERY_SECRETS_KEY_ROTATE ?? ''),
    adminKey: process.env.TUNERY_ADMIN_KEY || undefined,
    ...overrides,
  };
}
