/**
 * The full Tunery server in its own process, for the benchmarks: auth, request and response
 * validation, knex on embedded PGlite (on disk in a temp data dir, as `tunery-server start` keeps
 * it) or, with `--db postgres`, on a scratch database created on DATABASE_URL's server and dropped
 * at exit. Logging is off, as it is for the bare peer (BENCH_LOG_LEVEL=error pnpm bench shows the
 * server's errors on stderr).
 *
 * Creates an admin key, a worker token and one training job through the API; with `--queue N`
 * also enqueues N more finetune jobs like it, in one transaction (for the worker-protocol
 * benchmarks). With `--enqueue-on-signal` those N jobs are enqueued only when the process receives
 * SIGUSR2 (the herd benchmark: workers are long-polling by then); their ids are known beforehand.
 * Then prints one line — `READY {url, db, pid, apiKey, workerToken, jobId, pending: [ids], queued:
 * [ids]}` — and serves until SIGTERM, SIGINT or the end of its stdin.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { createKey } from '../src/auth.js';
import { loadConfig } from '../src/config.js';
import { newId } from '../src/ids.js';
import { enqueueJob } from '../src/queue/enqueue.js';
import type { JobRow } from '../src/queue/types.js';
import { type RunningServer, startServer } from '../src/server.js';
import { CREATE_JOB_BODY } from './job-body.js';
import { type ScratchDatabase, scratchDatabase } from './scratch-db.js';
import { stopWithParent } from './stop-with-parent.js';

export interface TuneryInfo {
  url: string;
  db: 'pglite' | 'postgres';
  apiKey: string;
  workerToken: string;
  /** A pending finetune job of the admin key's tenant, created through the API. */
  jobId: string;
  /** Every pending job (the API-created one and the `--queue` batch). */
  pending: string[];
  /** The server's process, for `--enqueue-on-signal`'s SIGUSR2. */
  pid: number;
  /** The `--queue` batch's ids (pending once enqueued; with `--enqueue-on-signal`, on SIGUSR2). */
  queued: string[];
}

const { values } = parseArgs({
  options: {
    db: { type: 'string', default: 'pglite' },
    queue: { type: 'string', default: '0' },
    'enqueue-on-signal': { type: 'boolean', default: false },
  },
});
const db = values.db === 'postgres' ? 'postgres' : 'pglite';
const queueSize = Number(values.queue);

const dataDir = await mkdtemp(join(tmpdir(), 'tunery-bench-'));
let scratch: ScratchDatabase | undefined;
let server: RunningServer | undefined;
let stopping: Promise<void> | undefined;
/** Stops what has started so far, drops the scratch database, removes the data dir, exits. */
const shutdown = (code: number) => {
  stopping ??= (async () => {
    // A graceful close waits for open connections (a load generator may still be sending): not long.
    const patience = new Promise((resolve) => setTimeout(resolve, 2000).unref());
    await Promise.race([server?.close().catch(() => {}), patience]);
    await scratch?.drop().catch(() => {});
    await rm(dataDir, { recursive: true, force: true });
    process.exit(code);
  })();
  return stopping;
};
// From the start, so a stop during startup cleans up too.
stopWithParent(() => shutdown(0));
// Once the parent is gone, a stray log line (knex warns as connections close) must not crash the cleanup.
process.stdout.on('error', () => {});
process.stderr.on('error', () => {});

try {
  if (db === 'postgres') scratch = await scratchDatabase();
  const logLevel = process.env.BENCH_LOG_LEVEL || 'silent';
  const config = loadConfig({ port: 0, host: '127.0.0.1', dataDir, databaseUrl: scratch?.url, logLevel });
  const tunery = await startServer(config, { quiet: logLevel === 'silent' });
  server = tunery;

  const apiKey = tunery.adminKey!;
  const workerToken = await createKey(tunery.ctx.knex, { kind: 'worker', name: 'bench' });
  const created = await fetch(`${tunery.url}/v1/training/jobs`, {
    method: 'POST',
    headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json' },
    body: JSON.stringify(CREATE_JOB_BODY),
  });
  if (created.status !== 201) {
    throw new Error(`POST /v1/training/jobs answered ${created.status}: ${await created.text()}`);
  }
  const jobId = ((await created.json()) as { id: string }).id;

  // The batch copies the API-created job, so each claim carries its spec and dataset input.
  const model = (await tunery.ctx.knex('jobs').where({ id: jobId }).first()) as JobRow;
  const queued = Array.from({ length: queueSize }, () => newId('job'));
  /** Enqueues the batch in one transaction: one signal for all of it. */
  const enqueueBatch = () =>
    tunery.ctx.knex.transaction(async (trx) => {
      for (const [i, id] of queued.entries()) {
        await enqueueJob(tunery.ctx, trx, {
          id,
          tenantId: model.tenant_id,
          kind: 'training',
          type: model.type,
          method: model.method,
          name: `bench-${i}`,
          // Each its own output name, as separate runs have (one adapter name per tenant).
          config: { ...model.config, output_name: `bench-output-${i}` },
          baseModel: model.base_model,
          datasetId: model.dataset_id,
          totalSteps: model.total_steps,
        });
      }
    });
  if (values['enqueue-on-signal']) {
    process.on('SIGUSR2', () => {
      enqueueBatch().catch((err) => process.stderr.write(`enqueue on signal failed: ${err}\n`));
    });
  } else if (queueSize > 0) {
    await enqueueBatch();
  }
  const pending = (await tunery.ctx.knex('jobs').where({ status: 'pending' }).pluck('id')) as string[];
  const info: TuneryInfo = {
    url: tunery.url,
    db,
    pid: process.pid,
    apiKey,
    workerToken,
    jobId,
    pending,
    queued,
  };
  process.stdout.write(`READY ${JSON.stringify(info)}\n`);
} catch (err) {
  process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  await shutdown(1);
}
