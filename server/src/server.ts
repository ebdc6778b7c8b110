import { EventEmitter } from 'node:events';
import { chmod, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import type { DestinationStream, Logger } from 'pino';
import { createApp } from './app.js';
import { createKey, hasAnyKey, OPERATOR_TENANT } from './auth.js';
import type { Config } from './config.js';
import type { AppContext } from './context.js';
import { type Database, makePrivateDir, migrate, openDatabase, pgliteDir, restrictToOwner } from './db.js';
import type { ErrorCode } from './errors.js';
import { createLogger } from './logging.js';
import { createMetrics } from './metrics.js';
import { createPartSweeper, partSweeperConfig } from './part-sweeper.js';
import { listenForJobs } from './queue/notify.js';
import { extendLeasesAfterStart } from './queue/restart.js';
import { analyzing } from './queue/statistics.js';
import { startSweeper } from './queue/sweeper.js';
import { expressHttpClasses } from './route-table.js';
import { checkSecretsKey, loadSecretsKey, SecretBox, sealPlaintextSecrets } from './secrets.js';
import { seedCatalog } from './services/catalog.js';
import { listenForInference } from './services/inference.js';
import { startWebhookDispatcher } from './services/webhooks.js';
import { LocalStorage } from './storage.js';

export interface RunningServer {
  url: string;
  ctx: AppContext;
  /** The admin key created on first start (undefined when keys already existed). */
  adminKey: string | undefined;
  close(): Promise<void>;
}

/**
 * Opens the database, migrates, seeds, and listens. `inMemory` keeps PGlite off disk (tests);
 * `logDestination` replaces stdout for the log (tests read what was logged).
 */
export async function startServer(
  config: Config,
  opts: { inMemory?: boolean; quiet?: boolean; logDestination?: DestinationStream } = {},
): Promise<RunningServer> {
  // The data dir holds the database, keys and every tenant's files: this user's alone.
  makePrivateDir(config.dataDir);
  const logger = createLogger(opts.quiet ? 'silent' : config.logLevel, opts.logDestination);
  const db = openDatabase(config, opts);
  try {
    return await serveOn(db, config, opts, logger);
  } catch (err) {
    await db.close();
    throw err;
  }
}

/** Everything after the database opened; startServer closes it (and its lock) when this fails. */
async function serveOn(
  db: Database,
  config: Config,
  opts: { inMemory?: boolean },
  logger: Logger,
): Promise<RunningServer> {
  await migrate(db.knex);
  if (db.kind === 'pglite' && !opts.inMemory) await restrictToOwner(pgliteDir(config.dataDir));
  await seedCatalog(db.knex);
  const secretBox = new SecretBox(await loadSecretsKey(config));
  await checkSecretsKey(db.knex, secretBox, config.secretsKeyRotate);
  await sealPlaintextSecrets(db.knex, secretBox);
  const storage = new LocalStorage(config.dataDir, config.maxUploadBytes, config.storageQuotaBytes);
  const ctx: AppContext = {
    knex: db.knex,
    dbKind: db.kind,
    config,
    storage,
    logger,
    secretBox,
    queueSignal: new EventEmitter().setMaxListeners(0),
    shuttingDown: new AbortController(),
    metrics: createMetrics({ knex: db.knex, storage }),
  };
  const adminKey = await ensureAdminKey(ctx);
  await ctx.storage.prepare();
  // Before the first request: finish renames a crash interrupted, drop abandoned uploads.
  const partSweeper = createPartSweeper(ctx, partSweeperConfig(ctx));
  await partSweeper.runOnce();
  const stopListeningForJobs = await listenForJobs(ctx);
  const stopListeningForInference = await listenForInference(ctx);
  const stopListening = async () => {
    await stopListeningForJobs();
    await stopListeningForInference();
  };
  // Before the first sweep: leases that lapsed while the server was down are not the workers' fault.
  const extended = await extendLeasesAfterStart(ctx);
  if (extended > 0) logger.info({ extended }, 'extended the leases of running jobs after the start');
  const stopSweeper = startSweeper(ctx);
  const stopWebhooks = startWebhookDispatcher(ctx);

  const app = createApp(ctx);
  let server: Server;
  try {
    server = await new Promise((resolve, reject) => {
      const s = createServer(expressHttpClasses(app), app);
      s.once('error', reject);
      s.listen(config.port, config.host, () => {
        s.off('error', reject);
        // Once listening, a server error (accepting a connection failed) is logged, not fatal.
        s.on('error', (err) => logger.error({ err }, 'the HTTP server failed'));
        resolve(s);
      });
    });
  } catch (err) {
    // the port is taken (or the host wrong): stop what started, so the caller can close the database
    await stopSweeper();
    await stopWebhooks();
    await stopListening();
    throw err;
  }
  server.on('clientError', answerClientError);
  applyRequestTimeouts(server, config);
  const { port } = server.address() as AddressInfo;
  const url = `http://${config.host}:${port}`;
  const releaseAddress = await publishAddress(config.dataDir, localUrl(config.host, port));
  logger.info({ url, database: db.kind }, 'tunery server listening');

  let closing: Promise<void> | undefined;
  const close = () => {
    // Graceful: stop taking connections, release long-polls, let in-flight requests finish, then close the DB.
    closing ??= (async () => {
      ctx.shuttingDown.abort();
      await stopSweeper();
      await stopWebhooks();
      await partSweeper.stop();
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeIdleConnections();
      });
      await stopListening();
      await releaseAddress();
      await analyzing(ctx).catch(() => {}); // a statistics refresh still running (it only logs)
      await db.close();
    })();
    return closing;
  };
  return { url, ctx, adminKey, close };
}

/** First start: create an admin key for tenant `default`, print it once, keep a 0600 copy in the data dir. */
async function ensureAdminKey(ctx: AppContext): Promise<string | undefined> {
  if (await hasAnyKey(ctx.knex)) return undefined;
  const key = await createKey(ctx.knex, {
    kind: 'user',
    tenantId: OPERATOR_TENANT,
    admin: true,
    name: 'admin',
  });
  const file = adminKeyFile(ctx.config.dataDir);
  await writeFile(file, `${key}\n`, { mode: 0o600 });
  await chmod(file, 0o600);
  return key;
}

/** Where the first admin key is kept (0600), for the operator and the CLI. */
export const adminKeyFile = (dataDir: string) => join(dataDir, 'admin-key');

/** Where a running server writes its address, so that `tunery-server keys …` can find it. */
export const serverFile = (dataDir: string) => join(dataDir, 'server.json');

/** The URL a local client dials for a server bound to `host` (a wildcard bind answers on loopback). */
export function localUrl(host: string, port: number): string {
  const dial = host === '0.0.0.0' || host === '::' ? '127.0.0.1' : host;
  return `http://${dial.includes(':') ? `[${dial}]` : dial}:${port}`;
}

/** Writes `server.json` ({url, pid}); the returned function removes it unless another server replaced it. */
async function publishAddress(dataDir: string, url: string): Promise<() => Promise<void>> {
  const file = serverFile(dataDir);
  await writeFile(file, `${JSON.stringify({ url, pid: process.pid })}\n`, { mode: 0o600 });
  return async () => {
    try {
      const current = JSON.parse(await readFile(file, 'utf8')) as { pid?: number };
      if (current.pid === process.pid) await rm(file, { force: true });
    } catch {
      // gone or unreadable: nothing of ours to remove
    }
  };
}

/** Worker uploads and multipart dataset uploads: long transfers, limited by silence, not by total time. */
export function isUploadRequest(req: IncomingMessage): boolean {
  const path = (req.url ?? '').split('?')[0]!;
  if (req.method === 'PUT') return /^\/v1\/workers\/jobs\/[^/]+\/(checkpoints|outputs)\/[^/]+$/.test(path);
  return (
    req.method === 'POST' &&
    /^\/v1\/datasets\/?$/.test(path) &&
    (req.headers['content-type'] ?? '').startsWith('multipart/form-data')
  );
}

/**
 * Node's `requestTimeout` (300 s) cuts off any request not received whole in time, so a large
 * checkpoint over a slow link always failed ("Malformed HTTP request"). It is off here: ordinary
 * requests get the same kind of limit (TUNERY_REQUEST_TIMEOUT_SECONDS, then 408), uploads only an
 * idle limit (TUNERY_UPLOAD_IDLE_TIMEOUT_SECONDS without a byte closes the connection; the worker
 * resumes). Node's `headersTimeout` still bounds the headers of every request.
 */
function applyRequestTimeouts(server: Server, config: Config): void {
  server.requestTimeout = 0;
  server.on('request', (req: IncomingMessage, res: ServerResponse) => {
    if (isUploadRequest(req)) {
      req.setTimeout(config.uploadIdleTimeoutSeconds * 1000, () => req.socket.destroy());
      // Once the body is in, storing it (fsync, rename) may take a while without traffic.
      req.once('end', () => req.setTimeout(0));
      return;
    }
    if (config.requestTimeoutSeconds === 0) return;
    const timer = setTimeout(() => {
      if (req.complete) return;
      const timeout: ErrorCode = 'request_timeout';
      const body = JSON.stringify({
        error: { code: timeout, message: 'The request did not arrive in time.', param: null },
      });
      if (!res.headersSent) {
        res.writeHead(408, { 'content-type': 'application/json', connection: 'close' });
        res.end(body);
      }
      res.once('finish', () => req.socket.destroy());
      if (res.writableFinished) req.socket.destroy();
    }, config.requestTimeoutSeconds * 1000);
    timer.unref();
    res.once('close', () => clearTimeout(timer));
  });
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
