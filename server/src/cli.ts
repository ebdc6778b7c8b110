#!/usr/bin/env node
import { parseArgs } from 'node:util';
import { type Config, loadConfig } from './config.js';
import { STORABLE_MS } from './date-time.js';
import { migrate, openDatabase } from './db.js';
import { type KeyClient, keyClient } from './key-client.js';
import { startServer } from './server.js';

const USAGE = `Usage:
  tunery-server start                       run the server (PORT, TUNERY_DATA_DIR, DATABASE_URL, …)
  tunery-server migrate                     apply database migrations and exit
  tunery-server keys create --tenant NAME [--admin] [--name LABEL] [--expires-in 30d]
                                            print a new user API key (last line of stdout)
  tunery-server keys create --worker [--name LABEL] [--expires-in 30d]
                                            print a new worker token (last line of stdout)
  tunery-server keys list [--tenant NAME] [--all]
                                            list keys (id, prefix, status; never the secret)
  tunery-server keys revoke KEY_ID          revoke a key or worker token
Key commands go through the running server when one is up (its address is in the data dir's
server.json, its admin key in admin-key or TUNERY_ADMIN_KEY), else straight to the database.`;

const TENANT = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
const UNIT_MS = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 } as const;

/** `90m`, `12h`, `30d` → the instant that long from now. */
function expiryFrom(expiresIn: string | undefined): Date | undefined {
  if (expiresIn === undefined) return undefined;
  const match = /^(\d+)([smhd])$/.exec(expiresIn);
  if (!match || Number(match[1]) === 0)
    throw new UsageError('--expires-in is a duration like 3600s, 90m, 12h or 30d.');
  const expiry = Date.now() + Number(match[1]) * UNIT_MS[match[2] as keyof typeof UNIT_MS];
  // the API's date-time bound (date-time.ts), which a key made straight in the database skips
  if (!(expiry < STORABLE_MS.to)) throw new UsageError('--expires-in reaches past the year 9999.');
  return new Date(expiry);
}

class UsageError extends Error {}

type KeyArgs = { values: Record<string, string | boolean | undefined>; positionals: string[] };

/** Runs `use` on a key client (the running server's API, or the database) and closes it. */
async function withKeys<T>(config: Config, use: (keys: KeyClient) => Promise<T>): Promise<T> {
  const keys = await keyClient(config);
  try {
    return await use(keys);
  } finally {
    await keys.close();
  }
}

async function createKeyCommand(config: Config, { values }: KeyArgs): Promise<void> {
  const tenant = values.tenant as string | undefined;
  if (Boolean(values.worker) === Boolean(tenant))
    throw new UsageError('Give exactly one of --tenant NAME or --worker.');
  if (values.worker && values.admin) throw new UsageError('Worker tokens cannot be admin keys.');
  const expiresAt = expiryFrom(values['expires-in'] as string | undefined);
  const name = values.name as string | undefined;
  await withKeys(config, async (keys) => {
    const created = await keys.create(
      tenant
        ? { kind: 'user', tenantId: tenant, admin: Boolean(values.admin), name, expiresAt }
        : { kind: 'worker', name, expiresAt },
    );
    const expiry = created.key.expires_at ? `, expires ${created.key.expires_at}` : '';
    process.stderr.write(`created ${created.key.id} (${created.key.kind}${expiry}) via ${keys.via}\n`);
    // the secret alone on the last line, for scripts (`| tail -n 1`)
    process.stdout.write(`${created.secret}\n`);
  });
}

async function listKeysCommand(config: Config, { values }: KeyArgs): Promise<void> {
  const rows = await withKeys(config, (keys) =>
    keys.list({ tenantId: values.tenant as string | undefined, includeInactive: Boolean(values.all) }),
  );
  const table = [['id', 'kind', 'tenant', 'admin', 'name', 'prefix', 'status', 'expires_at']];
  for (const k of rows) {
    const cells = [k.id, k.kind, k.tenant_id ?? '-', k.admin ? 'yes' : 'no', k.name ?? '-', `${k.prefix}…`];
    table.push([...cells, k.status, k.expires_at ?? 'never']);
  }
  const widths = table[0]!.map((_, i) => Math.max(...table.map((row) => row[i]!.length)));
  for (const row of table) {
    process.stdout.write(
      `${row
        .map((cell, i) => cell.padEnd(widths[i]!))
        .join('  ')
        .trimEnd()}\n`,
    );
  }
}

async function revokeKeyCommand(config: Config, { positionals }: KeyArgs): Promise<void> {
  if (positionals.length !== 1) throw new UsageError('Give the key id to revoke: keys revoke key_….');
  const key = await withKeys(config, (keys) => keys.revoke(positionals[0]!));
  const tenant = key.tenant_id ? `, tenant ${key.tenant_id}` : '';
  process.stdout.write(`revoked ${key.id} (${key.kind}${tenant}, ${key.prefix}…)\n`);
}

const KEY_COMMANDS: Record<string, (config: Config, args: KeyArgs) => Promise<void>> = {
  create: createKeyCommand,
  list: listKeysCommand,
  revoke: revokeKeyCommand,
};

async function keysCommand(config: Config, sub: string | undefined, args: string[]): Promise<void> {
  const command = sub ? KEY_COMMANDS[sub] : undefined;
  if (!command) throw new UsageError(`Unknown keys command "${sub ?? ''}".`);
  const parsed = parseArgs({
    args,
    allowPositionals: sub === 'revoke',
    options: {
      tenant: { type: 'string' },
      worker: { type: 'boolean' },
      admin: { type: 'boolean' },
      name: { type: 'string' },
      'expires-in': { type: 'string' },
      all: { type: 'boolean' },
    },
  });
  const tenant = parsed.values.tenant;
  if (tenant !== undefined && !TENANT.test(tenant)) {
    throw new UsageError('Tenant names are letters, digits, "_" and "-" (at most 64).');
  }
  await command(config, parsed);
}

async function main(argv: string[]): Promise<number> {
  // Everything this process writes (database, keys, server.json) is the owner's alone.
  process.umask(0o077);
  const [command, sub, ...rest] = argv;
  const config = loadConfig();
  if (command === 'start') {
    const server = await startServer(config);
    if (server.adminKey) {
      process.stdout.write(
        `\nAdmin API key (shown once; also saved to ${config.dataDir}/admin-key):\n${server.adminKey}\n\n`,
      );
    }
    process.stdout.write(
      `tunery-server listening on ${server.url} (database: ${server.ctx.dbKind}, pid ${process.pid})\n`,
    );
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
    try {
      const applied = await migrate(db.knex);
      process.stdout.write(applied.length ? `applied: ${applied.join(', ')}\n` : 'database is up to date\n');
    } finally {
      await db.close();
    }
    return 0;
  }
  if (command === 'keys') {
    try {
      await keysCommand(config, sub, rest);
      return 0;
    } catch (err) {
      if (!(err instanceof UsageError || (err as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')))
        throw err;
      process.stderr.write(`${(err as Error).message}\n${USAGE}\n`);
      return 2;
    }
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
