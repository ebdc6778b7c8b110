import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import knexFactory, { type Knex } from 'knex';
import ClientPgLite from 'knex-pglite';
import type { Config } from './config.js';
import { migrations } from './migrations/index.js';

export type Db = Knex;
export type DatabaseKind = 'postgres' | 'pglite';

export interface Database {
  knex: Knex;
  kind: DatabaseKind;
}

/** DATABASE_URL → node-postgres pool; unset → embedded PGlite in `${dataDir}/db` (or in memory for tests). */
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
    return { knex, kind: 'postgres' };
  }
  let connection: object = {};
  if (!opts.inMemory) {
    const dir = join(config.dataDir, 'db');
    mkdirSync(dir, { recursive: true });
    connection = { filename: dir };
  }
  // PGlite is one connection; knex-pglite pins the pool to it, so queries queue up in order.
  const knex = knexFactory({ client: ClientPgLite, dialect: 'postgres', connection });
  return { knex, kind: 'pglite' };
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
