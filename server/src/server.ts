import { EventEmitter } from 'node:events';
import { chmod, mkdir, writeFile } from 'node:fs/promises';
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { pino } from 'pino';
import { createApp } from './app.js';
import { createKey, hasAnyKey } from './auth.js';
import type { Config } from './config.js';
import type { AppContext } from './context.js';
import { migrate, openDatabase } from './db.js';
import { listenForJobs } from './queue/notify.js';
import { extendLeasesAfterStart } from './queue/restart.js';
import { startSweeper } from './queue/sweeper.js';
import { seedCatalog } from './services/catalog.js';
import { LocalStorage } from './storage.js';

export interface RunningServer {
  url: string;
  ctx: AppContext;
  /** The admin key created on first start (undefined when keys already existed). */
  adminKey: string | undefined;
  close(): Promise<void>;
}

/** Opens the database, migrates, seeds, and listens. `inMemory` keeps PGlite off disk (tests). */
export async function startServer(
  config: Config,
  opts: { inMemory?: boolean; quiet?: boolean } = {},
): Promise<RunningServer> {
  await mkdir(config.dataDir, { recursive: true });
  const logger = pino({ level: opts.quiet ? 'silent' : config.logLevel });
  const db = openDatabase(config, opts);
  await migrate(db.knex);
  await seedCatalog(db.knex);
  const ctx: AppContext = {
    knex: db.knex,
    dbKind: db.kind,
    config,
    storage: new LocalStorage(config.dataDir, config.maxUploadBytes, config.storageQuotaBytes),
    logger,
    queueSignal: new EventEmitter().setMaxListeners(0),
    shuttingDown: new AbortController(),
  };
  const adminKey = await ensureAdminKey(ctx);
  const stopListening = await listenForJobs(ctx);
  // Before the first sweep: leases that lapsed while the server was down are not the workers' fault.
  const extended = await extendLeasesAfterStart(ctx);
  if (extended > 0) logger.info({ extended }, 'extended the leases of running jobs after the start');
  const stopSweeper = startSweeper(ctx);

  const app = createApp(ctx);
  const server: Server = await new Promise((resolve) => {
    const s = app.listen(config.port, config.host, () => resolve(s));
  });
  server.on('clientError', answerClientError);
  const { port } = server.address() as AddressInfo;
  const url = `http://${config.host}:${port}`;
  logger.info({ url, database: db.kind }, 'tunery server listening');

  let closing: Promise<void> | undefined;
  const close = () => {
    // Graceful: stop taking connections, release long-polls, let in-flight requests finish, then close the DB.
    closing ??= (async () => {
      ctx.shuttingDown.abort();
      await stopSweeper();
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeIdleConnections();
      });
      await stopListening();
      await db.knex.destroy();
    })();
    return closing;
  };
  return { url, ctx, adminKey, close };
}

/** First start: create an admin key for tenant `default`, print it once, keep a 0600 copy in the data dir. */
async function ensureAdminKey(ctx: AppContext): Promise<string | undefined> {
  if (await hasAnyKey(ctx.knex)) return undefined;
  const key = await createKey(ctx.knex, { kind: 'user', tenantId: 'default', admin: true, name: 'admin' });
  const file = join(ctx.config.dataDir, 'admin-key');
  await writeFile(file, `${key}\n`, { mode: 0o600 });
  await chmod(file, 0o600);
  return key;
}

/**
 * Requests Node refuses before Express sees them (headers too large, a garbled request line) still
 * get the API's JSON error shape, not Node's bare status line.
 */
function answerClientError(err: NodeJS.ErrnoException, socket: Duplex): void {
  if (!socket.writable) {
    socket.destroy();
    return;
  }
  const tooLarge = err.code === 'HPE_HEADER_OVERFLOW';
  const status = tooLarge ? '431 Request Header Fields Too Large' : '400 Bad Request';
  const error = tooLarge
    ? { code: 'invalid_request', message: 'Request headers are too large.', param: null }
    : { code: 'invalid_request', message: 'Malformed HTTP request.', param: null };
  const body = JSON.stringify({ error });
  socket.end(
    `HTTP/1.1 ${status}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
}
