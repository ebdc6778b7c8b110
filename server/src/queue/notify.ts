import type { Knex } from 'knex';
import pg from 'pg';
import type { AppContext } from '../context.js';

const CHANNEL = 'tunery_jobs';

/**
 * Wakes long-polling claims. On Postgres, NOTIFY reaches every server process sharing the database
 * (each LISTENs on one dedicated connection); on PGlite there is one process, so an in-process event
 * is enough.
 */
export async function notifyJobAvailable(
  ctx: Pick<AppContext, 'knex' | 'dbKind' | 'queueSignal'>,
): Promise<void> {
  if (ctx.dbKind === 'postgres') await ctx.knex.raw(`NOTIFY ${CHANNEL}`);
  else ctx.queueSignal.emit('job-available');
}

/** Transactions that already have a notification waiting for their commit. */
const notifyingTransactions = new WeakSet<Knex.Transaction>();

/**
 * Notifies once `db`'s transaction has committed (at once when `db` is not a transaction), so a
 * woken claim can see the row. A rolled-back transaction notifies nobody, and a transaction that
 * makes many jobs claimable (a batch enqueue) notifies once: every waiter wakes on one signal.
 */
export function notifyAfterCommit(
  ctx: Pick<AppContext, 'knex' | 'dbKind' | 'queueSignal'>,
  db: Knex | Knex.Transaction,
): void {
  if (db.isTransaction) {
    const trx = db as Knex.Transaction;
    if (notifyingTransactions.has(trx)) return;
    notifyingTransactions.add(trx);
  }
  const committed = db.isTransaction ? (db as Knex.Transaction).executionPromise : Promise.resolve();
  committed.then(
    () => notifyJobAvailable(ctx).catch(() => {}),
    () => {},
  );
}

/** Starts the LISTEN connection of the job queue (Postgres only); returns a function that closes it. */
export function listenForJobs(ctx: AppContext): Promise<() => Promise<void>> {
  return listen(ctx, CHANNEL, 'queue listener', () => ctx.queueSignal.emit('job-available'));
}

/**
 * LISTENs on `channel` on a dedicated connection (Postgres only: PGlite has one process, which
 * signals in process) and hands each payload to `onPayload`; returns a function that closes it.
 */
export async function listen(
  ctx: AppContext,
  channel: string,
  name: string,
  onPayload: (payload: string) => void,
): Promise<() => Promise<void>> {
  if (ctx.dbKind !== 'postgres' || !ctx.config.databaseUrl) return async () => {};
  const client = new pg.Client({ connectionString: ctx.config.databaseUrl });
  client.on('error', (err) => ctx.logger.warn({ err }, `${name} connection error`));
  await client.connect();
  client.on('notification', (n) => onPayload(n.payload ?? ''));
  await client.query(`LISTEN ${channel}`);
  return async () => {
    await client.end().catch(() => {});
  };
}

/** Resolves on the next 'job-available' signal, after `ms`, or on shutdown — whichever comes first. */
export function waitForJobSignal(ctx: AppContext, ms: number): Promise<void> {
  return waitForSignal(ctx, 'job-available', ms);
}

/** Resolves on the next `event` of the queue signal, after `ms`, or on shutdown — whichever comes first. */
export function waitForSignal(
  ctx: Pick<AppContext, 'queueSignal' | 'shuttingDown'>,
  event: string,
  ms: number,
): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      ctx.queueSignal.off(event, done);
      ctx.shuttingDown.signal.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    ctx.queueSignal.once(event, done);
    ctx.shuttingDown.signal.addEventListener('abort', done, { once: true });
  });
}
