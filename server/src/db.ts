import { chmodSync, mkdirSync } from 'node:fs';
import { chmod, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { PGlite } from '@electric-sql/pglite';
import { createPgConfig } from '@electric-sql/pglite/node-postgres';
import knexFactory, { type Knex } from 'knex';
import type { Config } from './config.js';
import { lockDatabaseDir } from './db-lock.js';
import { migrations } from './migrations/index.js';

export type Db = Knex;
export type DatabaseKind = 'postgres' | 'pglite';

export interface Database {
  knex: Knex;
  kind: DatabaseKind;
  /** Closes the connections and releases the embedded database's lock. */
  close(): Promise<void>;
}

/** Where the embedded database lives, and its lock file beside it. */
export const pgliteDir = (dataDir: string) => join(dataDir, 'db');
export const pgliteLockFile = (dataDir: string) => join(dataDir, 'db.lock');

/**
 * DATABASE_URL → node-postgres pool; unset → embedded PGlite in `${dataDir}/db` (or in memory for
 * tests). The embedded database is locked to this process: a second one gets DatabaseLocked.
 */
export function openDatabase(
  config: Pick<Config, 'databaseUrl' | 'dataDir'>,
  opts: { inMemory?: boolean } = {},
): Database {
  if (config.databaseUrl) {
    const knex = knexFactory({
      client: 'pg',
      connection: config.databaseUrl,
      pool: { min: 0, max: 10 },
    });
    return { knex, kind: 'postgres', close: () => knex.destroy() };
  }
  let dir: string | undefined;
  let release = () => {};
  if (!opts.inMemory) {
    dir = pgliteDir(config.dataDir);
    makePrivateDir(config.dataDir);
    release = lockDatabaseDir(pgliteLockFile(config.dataDir), dir);
    makePrivateDir(dir);
  }
  const pglite = new PGlite(dir);
  const pgConfig = createPgConfig(pglite);
  // PGlite is one connection: node-postgres speaks to it through PGlite's adapter, one client at a
  // time, so queries queue up in order. A database that fails to open fails the first query (the
  // adapter alone would leave that failure unhandled and the query waiting).
  const connection = async () => {
    await pglite.waitReady;
    return pgConfig;
  };
  const knex = knexFactory({ client: 'pg', connection, pool: { min: 1, max: 1 } });
  return {
    knex,
    kind: 'pglite',
    close: async () => {
      try {
        await knex.destroy();
      } finally {
        try {
          await pglite.close();
        } finally {
          release();
        }
      }
    },
  };
}

/** A directory only this user can enter (0700), made if missing. */
export function makePrivateDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  chmodSync(dir, 0o700);
}

/**
 * Folders 0700 and files 0600 under `dir`: the embedded database's files, written by PGlite with
 * the process umask (an older server left them 0666), hold every tenant's data.
 */
export async function restrictToOwner(dir: string): Promise<void> {
  await chmod(dir, 0o700);
  for (const entry of await readdir(dir, { withFileTypes: true, recursive: true })) {
    const path = join(entry.parentPath, entry.name);
    if (entry.isDirectory()) await chmod(path, 0o700);
    else if (entry.isFile()) await chmod(path, 0o600);
  }
}

export async function migrate(knex: Knex): Promise<string[]> {
  const [, applied] = (await knex.migrate.latest({
    migrationSource: {
      getMigrations: async () => migrations.map((m) => m.name),
      getMigrationName: (name: string) => name,
      getMigration: async (name: string) => migrations.find((m) => m.name === name)!,
    },
  })) as [number, string[]];
  return applied;
}
