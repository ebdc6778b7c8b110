import type { AppContext } from '../context.js';

/**
 * A transaction that makes this many jobs runnable at once is a burst: the planner's statistics of
 * `jobs` still describe the queue before it (few pending rows, or none on a new database), and a
 * claim planned on them reads and sorts every pending row instead of taking the first from the
 * index in claim order (5 ms a claim at 2,000 pending, against 0.05 ms). Autovacuum notices a
 * burst only after its naptime (a minute), so the burst is followed by an ANALYZE at once.
 */
export const BURST_JOBS = 100;

/** How often the queue's tables get fresh statistics anyway (slow drift, other servers' bursts). */
export const ANALYZE_INTERVAL_MS = 5 * 60 * 1000;

type StatsContext = Pick<AppContext, 'knex' | 'logger'>;

/** The ANALYZE in progress, and whether another was asked for while it ran. */
const inFlight = new WeakMap<StatsContext['knex'], { done: Promise<void>; again: boolean }>();

/**
 * Refreshes the planner's statistics of `jobs` (its cached claim plans are replanned on them). One
 * ANALYZE at a time per database handle: asked for while one runs, it runs once more afterwards,
 * so rows committed meanwhile are counted too.
 */
export function analyzeJobs(ctx: StatsContext): Promise<void> {
  const running = inFlight.get(ctx.knex);
  if (running) {
    running.again = true;
    return running.done;
  }
  const state = { again: false, done: Promise.resolve() };
  state.done = (async () => {
    try {
      do {
        state.again = false;
        await ctx.knex.raw('ANALYZE jobs');
      } while (state.again);
    } finally {
      inFlight.delete(ctx.knex);
    }
  })();
  inFlight.set(ctx.knex, state);
  return state.done;
}

/** Settles when the ANALYZE in progress on this database (if any) has finished. */
export function analyzing(ctx: StatsContext): Promise<void> {
  return inFlight.get(ctx.knex)?.done ?? Promise.resolve();
}

/** After a committed burst of runnable jobs: fresh statistics now, in the background. */
export function analyzeAfterBurst(ctx: StatsContext, runnable: number): void {
  if (runnable < BURST_JOBS) return;
  analyzeJobs(ctx).catch((err: unknown) =>
    ctx.logger.warn({ err, task: 'analyze jobs' }, 'ANALYZE after a burst of jobs failed'),
  );
}
