/**
 * What `tunery-server keys …` talks to: the running server's admin API when one is up (an embedded
 * database belongs to that process alone, and the server evicts a revoked key from its cache at
 * once), else the database itself.
 */
import { readFile } from 'node:fs/promises';
import type { NewKey } from './auth.js';
import type { Config } from './config.js';
import { migrate, openDatabase, pgliteLockFile } from './db.js';
import { isAlive, lockOwner } from './db-lock.js';
import type { Schemas } from './http.js';
import { adminKeyFile, localUrl, serverFile } from './server.js';
import { createApiKey, type KeyFilter, listKeys, revokeApiKey } from './services/api-keys.js';

export interface KeyClient {
  /** Where the commands go, for the CLI's message. */
  via: string;
  create(opts: NewKey): Promise<Schemas['CreatedApiKey']>;
  list(filter: Omit<KeyFilter, 'kind'>): Promise<Schemas['ApiKey'][]>;
  revoke(keyId: string): Promise<Schemas['ApiKey']>;
  close(): Promise<void>;
}

const PAGE = 100;

export async function keyClient(config: Config): Promise<KeyClient> {
  const url = await runningServerUrl(config);
  return url ? apiKeyClient(url, await adminKey(config)) : databaseKeyClient(config);
}

/**
 * The URL of a server running on this data directory: the one its server.json names (while that
 * process lives), else PORT/HOST's when a live process holds the embedded database, whichever
 * answers. A database held by a process that answers nowhere is an error, not a second opener.
 */
async function runningServerUrl(config: Config): Promise<string | undefined> {
  const holder = config.databaseUrl ? undefined : lockOwner(pgliteLockFile(config.dataDir));
  const candidates = [
    await publishedUrl(config.dataDir),
    holder === undefined ? undefined : localUrl(config.host, config.port),
  ].filter((url): url is string => url !== undefined);
  for (const url of candidates) if (await answers(url)) return url;
  if (holder !== undefined) {
    throw new Error(
      `Process ${holder} holds the embedded database in ${config.dataDir}, but no server answers at ` +
        `${candidates.join(' or ')}; set PORT and HOST to where it listens, or stop it.`,
    );
  }
  return undefined;
}

async function publishedUrl(dataDir: string): Promise<string | undefined> {
  try {
    const published = JSON.parse(await readFile(serverFile(dataDir), 'utf8')) as {
      url?: string;
      pid?: number;
    };
    return published.url && published.pid && isAlive(published.pid) ? published.url : undefined;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' || err instanceof SyntaxError) return undefined;
    throw err;
  }
}

/** Whether a server answers at `url` (any HTTP answer will do). */
const answers = (url: string) =>
  fetch(`${url}/v1/health`, { signal: AbortSignal.timeout(5000) }).then(
    () => true,
    () => false,
  );

async function adminKey(config: Config): Promise<string> {
  if (config.adminKey) return config.adminKey;
  try {
    return (await readFile(adminKeyFile(config.dataDir), 'utf8')).trim();
  } catch {
    throw new Error(
      `A server is running, and key commands go through it; set TUNERY_ADMIN_KEY to an admin key of tenant "default" (${adminKeyFile(config.dataDir)} is missing).`,
    );
  }
}

function apiKeyClient(baseUrl: string, key: string): KeyClient {
  const call = async <T>(method: string, path: string, body?: unknown): Promise<T> => {
    let res: Response;
    try {
      res = await fetch(`${baseUrl}${path}`, {
        method,
        headers: { authorization: `Bearer ${key}`, ...(body ? { 'content-type': 'application/json' } : {}) },
        body: body ? JSON.stringify(body) : undefined,
      });
    } catch (err) {
      throw new Error(
        `The server at ${baseUrl} holds the database but does not answer (${(err as Error).message}).`,
      );
    }
    const answer = (await res.json().catch(() => ({}))) as T & { error?: { code: string; message: string } };
    if (!res.ok) {
      throw new Error(
        `The server at ${baseUrl} answered ${res.status} ${answer.error?.code ?? ''}: ${answer.error?.message ?? ''}`,
      );
    }
    return answer;
  };
  return {
    via: `the server at ${baseUrl}`,
    create: (opts) =>
      call('POST', '/v1/admin/keys', {
        kind: opts.kind,
        ...(opts.kind === 'user' ? { tenant_id: opts.tenantId, admin: Boolean(opts.admin) } : {}),
        ...(opts.name ? { name: opts.name } : {}),
        ...(opts.expiresAt ? { expires_at: opts.expiresAt.toISOString() } : {}),
      }),
    list: async (filter) => {
      const keys: Schemas['ApiKey'][] = [];
      for (let offset = 0; ; offset += PAGE) {
        const query = new URLSearchParams({ limit: String(PAGE), offset: String(offset) });
        if (filter.tenantId) query.set('tenant_id', filter.tenantId);
        if (filter.includeInactive) query.set('include_inactive', 'true');
        const page = await call<Schemas['ApiKeyList']>('GET', `/v1/admin/keys?${query}`);
        keys.push(...page.keys);
        if (!page.has_more) return keys;
      }
    },
    revoke: (keyId) => call('POST', `/v1/admin/keys/${encodeURIComponent(keyId)}/revoke`),
    close: async () => {},
  };
}

/** Straight to the database (no server up): as the operator, and under the embedded database's lock. */
async function databaseKeyClient(config: Config): Promise<KeyClient> {
  const db = openDatabase(config);
  try {
    await migrate(db.knex);
  } catch (err) {
    await db.close();
    throw err;
  }
  return {
    via: 'the database',
    create: (opts) => createApiKey(db.knex, opts),
    list: async (filter) => {
      const keys: Schemas['ApiKey'][] = [];
      for (let offset = 0; ; offset += PAGE) {
        const page = await listKeys(db.knex, filter, { limit: PAGE, offset });
        keys.push(...page.keys);
        if (!page.has_more) return keys;
      }
    },
    revoke: (keyId) => revokeApiKey(db.knex, keyId, undefined),
    close: () => db.close(),
  };
}
