import type { AppContext } from '../context.js';
import { repeatEvery } from '../periodic.js';
import { type RescueCounts, rescueExpiredLeases } from './rescue.js';
import { ANALYZE_INTERVAL_MS, analyzeJobs } from './statistics.js';

export interface SweeperConfig {
  /** Time between passes, ms. */
  intervalMs: number;
  /** Jobs rescued per statement; a full batch means more may be waiting, so the pass goes on. */
  batchSize: number;
}

export const SWEEPER_DEFAULTS: SweeperConfig = { intervalMs: 5000, batchSize: 100 };

/** Refuses a config that would spin or never run. */
export function validateSweeperConfig(partial: Partial<SweeperConfig>): SweeperConfig {
  const config = { ...SWEEPER_DEFAULTS, ...partial };
  if (!Number.isFinite(config.intervalMs) || config.intervalMs < 10) {
    throw new Error(`sweeper intervalMs must be at least 10, got ${config.intervalMs}`);
  }
  if (!Number.isInteger(config.batchSize) || config.batchSize < 1) {
    throw new Error(`sweeper batchSize must be a positive integer, got ${config.batchSize}`);
  }
  return config;
}

export interface Sweeper {
  /** One full pass: batches until a short batch. */
  runOnce(): Promise<RescueCounts>;
  stop(): Promise<void>;
}

/** The maintenance loop that gives expired leases back to the queue. */
export function createSweeper(ctx: AppContext, partial: Partial<SweeperConfig> = {}): Sweeper {
  const config = validateSweeperConfig(partial);

  const runOnce = async (): Promise<RescueCounts> => {
    const total: RescueCounts = { retried: 0, cancelled: 0, failed: 0 };
    for (;;) {
      const counts = await rescueExpiredLeases(ctx, config.batchSize);
      total.retried += counts.retried;
      total.cancelled += counts.cancelled;
      total.failed += counts.failed;
      if (counts.retried + counts.cancelled + counts.failed < config.batchSize) return total;
    }
  };

  const loop = repeatEvery(
    config.intervalMs,
    async () => {
      const counts = await runOnce();
      for (const outcome of ['retried', 'cancelled', 'failed'] as const) {
        if (counts[outcome] > 0) ctx.metrics.leaseExpiries.inc({ outcome }, counts[outcome]);
      }
      if (counts.retried + counts.cancelled + counts.failed > 0) {
        ctx.logger.info({ ...counts }, 'sweeper rescued expired leases');
      }
    },
    (err) => ctx.logger.error({ err, task: 'rescue expired leases' }, 'sweeper pass failed; will retry'),
  );

  return { runOnce, stop: loop.stop };
}

/** Starts the lease sweeper with the server's interval, and the queue's ANALYZE; returns a function that stops both. */
export function startSweeper(ctx: AppContext): () => Promise<void> {
  const sweeper = createSweeper(ctx, { intervalMs: ctx.config.sweepIntervalMs });
  const analyze = repeatEvery(
    ANALYZE_INTERVAL_MS,
    () => analyzeJobs(ctx),
    (err) => ctx.logger.warn({ err, task: 'analyze jobs' }, 'ANALYZE failed; will retry'),
  );
  return async () => {
    await sweeper.stop();
    await analyze.stop();
  };
}
