import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import type { DestinationStream } from 'pino';
import { createKey } from '../src/auth.js';
import { type Config, loadConfig } from '../src/config.js';
import { type RunningServer, startServer } from '../src/server.js';

/** The two databases every server test runs on. */
export const DATABASES = ['pglite', 'postgres'] as const;
export type DatabaseChoice = (typeof DATABASES)[number];

const baseUrl = process.env.TUNERY_TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test';

export interface TestServer extends RunningServer {
  /** An admin user key of tenant `default`. */
  key: string;
  /** A user key of another tenant, for isolation checks. */
  otherKey: string;
  workerToken: string;
  dataDir: string;
  /** fetch against the server with a key (the default tenant's unless given). */
  api(path: string, init?: RequestInit & { key?: string | null; json?: unknown }): Promise<Response>;
  stop(): Promise<void>;
}

/** A fresh database for one test file: its own Postgres database, or an in-memory PGlite. */
async function freshDatabaseUrl(
  choice: DatabaseChoice,
): Promise<{ url: string | undefined; drop(): Promise<void> }> {
  if (choice === 'pglite') return { url: undefined, drop: async () => {} };
  const name = `tunery_test_${process.pid}_${Math.random().toString(36).slice(2, 10)}`;
  const admin = new pg.Client({ connectionString: baseUrl });
  await admin.connect();
  await admin.query(`CREATE DATABASE ${name}`);
  await admin.end();
  const url = new URL(baseUrl);
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    drop: async () => {
      const c = new pg.Client({ connectionString: baseUrl });
      await c.connect();
      await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      await c.end();
    },
  };
}

export async function startTestServer(
  choice: DatabaseChoice,
  overrides: Partial<Config> = {},
  /** Where the log goes (at `overrides.logLevel`); by default tests log nothing. */
  logDestination?: DestinationStream,
): Promise<TestServer> {
  const dataDir = await mkdtemp(join(tmpdir(), 'tunery-test-'));
  const database = await freshDatabaseUrl(choice);
  const config = loadConfig({
    port: 0,
    dataDir,
    databaseUrl: database.url,
    sweepIntervalMs: 200,
    ...overrides,
  });
  const server = await startServer(config, {
    inMemory: true,
    quiet: !logDestination && !process.env.TUNERY_TEST_LOGS,
    logDestination,
  });
  const key = server.adminKey!;
  const otherKey = await createKey(server.ctx.knex, { kind: 'user', tenantId: 'other-tenant' });
  const workerToken = await createKey(server.ctx.knex, { kind: 'worker' });
  const api: TestServer['api'] = (path, init = {}) => {
    const headers = new Headers(init.headers);
    const useKey = init.key === undefined ? key : init.key;
    if (useKey) headers.set('authorization', `Bearer ${useKey}`);
    let body = init.body;
    if (init.json !== undefined) {
      headers.set('content-type', 'application/json');
      body = JSON.stringify(init.json);
    }
    return fetch(`${server.url}${path}`, { ...init, headers, body });
  };
  return {
    ...server,
    key,
    otherKey,
    workerToken,
    dataDir,
    api,
    stop: async () => {
      await server.close();
      await database.drop();
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}
