#!/usr/bin/env -S npx tsx
import { parseArgs } from 'node:util';
import { createKey } from './auth.js';
import { loadConfig } from './config.js';
import { migrate, openDatabase } from './db.js';
import { startServer } from './server.js';

const USAGE = `Usage:
  tunery-server start                       run the server (PORT, TUNERY_DATA_DIR, DATABASE_URL, …)
  tunery-server migrate                     apply database migrations and exit
  tunery-server keys create --tenant NAME [--admin] [--name LABEL]
                                            print a new user API key (last line of stdout)
  tunery-server keys create --worker [--name LABEL]
                                            print a new worker token (last line of stdout)`;

async function main(argv: string[]): Promise<number> {
  const [command, sub, ...rest] = argv;
  const config = loadConfig();
  if (command === 'start') {
    const server = await startServer(config);
    if (server.adminKey) {
      process.stdout.write(
        `\nAdmin API key (shown once; also saved to ${config.dataDir}/admin-key):\n${server.adminKey}\n\n`,
      );
    }
    const stop = async (signal: string) => {
      server.ctx.logger.info({ signal }, 'shutting down');
      await server.close();
      process.exit(0);
    };
    process.once('SIGINT', () => void stop('SIGINT'));
    process.once('SIGTERM', () => void stop('SIGTERM'));
    return new Promise<number>(() => {});
  }
  if (command === 'migrate') {
    const db = openDatabase(config);
    const applied = await migrate(db.knex);
    await db.knex.destroy();
    process.stdout.write(applied.length ? `applied: ${applied.join(', ')}\n` : 'database is up to date\n');
    return 0;
  }
  if (command === 'keys' && sub === 'create') {
    const { values } = parseArgs({
      args: rest,
      options: {
        tenant: { type: 'string' },
        worker: { type: 'boolean' },
        admin: { type: 'boolean' },
        name: { type: 'string' },
      },
    });
    if (Boolean(values.worker) === Boolean(values.tenant)) {
      process.stderr.write(`Give exactly one of --tenant NAME or --worker.\n${USAGE}\n`);
      return 2;
    }
    if (values.tenant && !/^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/.test(values.tenant)) {
      process.stderr.write('Tenant names are letters, digits, "_" and "-" (at most 64).\n');
      return 2;
    }
    const db = openDatabase(config);
    await migrate(db.knex);
    const key = values.worker
      ? await createKey(db.knex, { kind: 'worker', name: values.name })
      : await createKey(db.knex, {
          kind: 'user',
          tenantId: values.tenant!,
          admin: values.admin,
          name: values.name,
        });
    await db.knex.destroy();
    process.stdout.write(`${key}\n`);
    return 0;
  }
  process.stderr.write(`${USAGE}\n`);
  return command ? 2 : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`tunery-server: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  },
);
