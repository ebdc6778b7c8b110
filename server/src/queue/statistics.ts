import type { AppContext } from '../context.js';
import { getOrCreate } from '../get-or-create.js';

/**
 * This many jobs made runnable since the last ANALYZE (one batch, or one POST at a time) and the
 * planner's statistics of `jobs` may still describe the queue before them: few pending rows, or none
 * on a new database. A claim planned on that reads and sorts every pending row instead of taking the
 * first from the index in claim order (5 ms a claim at 2,000 pending, against 0.05 ms). Autovacuum
 * notices such a burst only after its naptime (a minute) on Postgres, and embedded PGlite has none,
 * so the server refreshes the statistics itself.
 */
export const BURST_JOBS = 100;

/** Bursts refresh the statistics at most this often (an ANALYZE samples up to 30,000 rows). */
const BURST_ANALYZE_GAP_MS = 10_000;

/** How often the queue's tables get fresh statistics anyway (slow drift, other servers' bursts). */
export const ANALYZE_INTERVAL_MS = 5 * 60 * 1000;

type StatsContext = Pick<AppContext, 'knex' | 'logger' | 'shuttingDown'>;
type Db = StatsContext['knex'];

/** The ANALYZE in progress, and whether another was asked for while it ran. */
const inFlight = new WeakMap<Db, { done: Promise<void>; again: boolean }>();

/** Runnable jobs signalled since the last burst ANALYZE began, and when it began. */
const sinceAnalyze = new WeakMap<Db, { runnable: number; at: number }>();

/**
 * Refreshes the planner's statistics of `jobs` (its cached claim plans are replanned on them). One
 * ANALYZE at a time per database handle: asked for while one runs, it runs once more afterwards,
 * so rows committed meanwhile are counted too. Nothing starts once the server is shutting down.
 */
export function analyzeJobs(ctx: StatsContext): Promise<void> {
  const running = inFlight.get(ctx.knex);
  if (running) {
    running.again = true;
    return running.done;
  }
  const state = { again: true, done: Promise.resolve() };
  inFlight.set(ctx.knex, state);
  state.done = (async () => {
    try {
      while (state.again && !ctx.shuttingDown.signal.aborted) {
        state.again = false;
        await ctx.knex.raw('ANALYZE jobs');
      }
    } finally {
      inFlight.delete(ctx.knex);
    }
  })();
  return state.done;
}

/** Settles when the ANALYZE in progress on this database (if any) has finished. */
export function analyzing(ctx: StatsContext): Promise<void> {
  return inFlight.get(ctx.knex)?.done ?? Promise.resolve();
}

/**
 * Counts `runnable` jobs that just became claimable (committed); once BURST_JOBS have since the last
 * burst ANALYZE (and BURST_ANALYZE_GAP_MS have passed), fresh statistics now, in the background.
 */
export function countRunnableJobs(ctx: StatsContext, runnable: number): void {
  const since = getOrCreate(sinceAnalyze, ctx.knex, () => ({ runnable: 0, at: Number.NEGATIVE_INFINITY }));
  since.runnable += runnable;
  if (since.runnable < BURST_JOBS || Date.now() - since.at < BURST_ANALYZE_GAP_MS) return;
  since.runnable = 0;
  since.at = Date.now();
  analyzeJobs(ctx).catch((err: unknown) => {
    if (!ctx.shuttingDown.signal.aborted)
      ctx.logger.warn({ err, task: 'analyze jobs' }, 'ANALYZE after a burst of jobs failed');
  });
}
