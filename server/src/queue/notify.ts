import type { EventEmitter } from 'node:events';
import type { Knex } from 'knex';
import pg from 'pg';
import type { AppContext } from '../context.js';
import { getOrCreate } from '../get-or-create.js';
import { countRunnableJobs } from './statistics.js';

const CHANNEL = 'tunery_jobs';
/** The queue signal's events: jobs became runnable (argument: how many), a gang started (broadcast). */
const JOBS_EVENT = 'job-available';
const GANG_EVENT = 'gang-started';
/** A NOTIFY payload that is not a count: a gang started. */
const GANG_PAYLOAD = 'gang';

type SignalContext = Pick<AppContext, 'knex' | 'dbKind' | 'queueSignal' | 'logger' | 'shuttingDown'>;

/**
 * Tells long-polling claims that `count` jobs became runnable. On Postgres, NOTIFY reaches every
 * server process sharing the database (each LISTENs on one dedicated connection), the count as its
 * payload; on PGlite there is one process, so an in-process event is enough. They also count
 * towards the next refresh of the claim's statistics (queue/statistics.ts).
 */
export async function notifyJobsAvailable(ctx: SignalContext, count: number): Promise<void> {
  countRunnableJobs(ctx, count);
  if (ctx.dbKind === 'postgres') await ctx.knex.raw('SELECT pg_notify(?, ?)', [CHANNEL, String(count)]);
  else ctx.queueSignal.emit(JOBS_EVENT, count);
}

async function notifyGangStarted(ctx: SignalContext): Promise<void> {
  if (ctx.dbKind === 'postgres') await ctx.knex.raw('SELECT pg_notify(?, ?)', [CHANNEL, GANG_PAYLOAD]);
  else ctx.queueSignal.emit(GANG_EVENT);
}

/** Jobs made runnable by transactions that have not committed yet, signalled once they do. */
const pendingCounts = new WeakMap<Knex.Transaction, { count: number }>();

/**
 * Signals `count` more runnable jobs once `db`'s transaction has committed (at once when `db` is not
 * a transaction), so a woken claim can see the rows. A rolled-back transaction signals nothing, and a
 * transaction that makes many jobs claimable (a batch enqueue) signals once, with their total: that
 * many waiting claims wake, not every one.
 */
export function notifyAfterCommit(ctx: SignalContext, db: Knex | Knex.Transaction, count = 1): void {
  if (!db.isTransaction) {
    notifyJobsAvailable(ctx, count).catch(() => {});
    return;
  }
  const trx = db as Knex.Transaction;
  const pending = pendingCounts.get(trx);
  if (pending) {
    pending.count += count;
    return;
  }
  const total = { count };
  pendingCounts.set(trx, total);
  trx.executionPromise.then(
    () => notifyJobsAvailable(ctx, total.count).catch(() => {}),
    () => {},
  );
}

/** Wakes the members of a gang waiting in waitForGang (all of them) once `trx` commits. */
export function notifyGangAfterCommit(ctx: SignalContext, trx: Knex.Transaction): void {
  trx.executionPromise.then(
    () => notifyGangStarted(ctx).catch(() => {}),
    () => {},
  );
}

/** Starts the LISTEN connection of the job queue (Postgres only); returns a function that closes it. */
export function listenForJobs(ctx: AppContext): Promise<() => Promise<void>> {
  return listen(ctx, CHANNEL, 'queue listener', (payload) => {
    if (payload === GANG_PAYLOAD) ctx.queueSignal.emit(GANG_EVENT);
    // an empty payload (a server before counts) is one job
    else ctx.queueSignal.emit(JOBS_EVENT, Math.max(1, Number.parseInt(payload, 10) || 1));
  });
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

/**
 * A wake handed to one waiting claim. `hopsLeft`: how many more waiters it may be handed on to when
 * the claim it woke finds nothing (at most the waiters there were when it was signalled, so a job no
 * waiter can run does not keep a wake circling).
 */
export interface Wake {
  hopsLeft: number;
}

interface Waiter {
  deliver(wake: Wake | null): void;
}

/**
 * The claims of one process waiting for runnable jobs, first come first woken: a signal for N jobs
 * wakes at most N of them (no thundering herd). A woken claim that finds nothing hands its wake on
 * (handOn), so a job only another kind of worker can run still reaches one.
 */
class JobWaiters {
  private readonly queue: Waiter[] = [];

  constructor(signal: EventEmitter) {
    signal.on(JOBS_EVENT, (count?: number) => this.signal(count ?? 1));
  }

  get size(): number {
    return this.queue.length;
  }

  signal(count: number): void {
    const hops = this.queue.length - 1;
    for (let i = 0; i < count && this.queue.length > 0; i++) this.queue.shift()!.deliver({ hopsLeft: hops });
  }

  handOn(wake: Wake): void {
    if (wake.hopsLeft <= 0) return;
    this.queue.shift()?.deliver({ hopsLeft: wake.hopsLeft - 1 });
  }

  /** Resolves with a wake, or null after `ms` or on `stop`. */
  wait(ms: number, stop: AbortSignal): Promise<Wake | null> {
    return new Promise((resolve) => {
      const waiter: Waiter = {
        deliver: (wake) => {
          clearTimeout(timer);
          stop.removeEventListener('abort', leave);
          const at = this.queue.indexOf(waiter);
          if (at !== -1) this.queue.splice(at, 1);
          resolve(wake);
        },
      };
      const leave = () => waiter.deliver(null);
      const timer = setTimeout(leave, ms);
      stop.addEventListener('abort', leave, { once: true });
      this.queue.push(waiter);
    });
  }
}

/** One waiter queue per process (per queue signal: tests run several servers in one process). */
const waitersBySignal = new WeakMap<EventEmitter, JobWaiters>();

const waitersOf = (ctx: Pick<AppContext, 'queueSignal'>): JobWaiters =>
  getOrCreate(waitersBySignal, ctx.queueSignal, () => new JobWaiters(ctx.queueSignal));

/**
 * Waits in line for runnable jobs: resolves with the wake that woke this claim, or null after `ms`
 * (the recheck: jobs whose backoff ends wake nobody) or on shutdown.
 */
export function waitForJobs(
  ctx: Pick<AppContext, 'queueSignal' | 'shuttingDown'>,
  ms: number,
): Promise<Wake | null> {
  if (ctx.shuttingDown.signal.aborted) return Promise.resolve(null);
  return waitersOf(ctx).wait(ms, ctx.shuttingDown.signal);
}

/** A woken claim that found nothing (or went away) passes its wake to the next claim in line. */
export function handOnWake(ctx: Pick<AppContext, 'queueSignal'>, wake: Wake | null): void {
  if (wake) waitersOf(ctx).handOn(wake);
}

/** How many claims of this process are waiting for jobs. */
export function waitingClaims(ctx: Pick<AppContext, 'queueSignal'>): number {
  return waitersOf(ctx).size;
}

/** Resolves when a gang starts (any gang: the member looks again), after `ms`, or on shutdown. */
export function waitForGangStart(
  ctx: Pick<AppContext, 'queueSignal' | 'shuttingDown'>,
  ms: number,
): Promise<void> {
  return waitForSignal(ctx, GANG_EVENT, ms);
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
