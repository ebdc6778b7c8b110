/**
 * The maintenance loop for unfinished uploads (`files/.uploads/`): removes parts that killed or
 * abandoned uploads left behind once they are older than TUNERY_UPLOAD_PART_MAX_AGE_SECONDS (a
 * worker may resume until then), and finishes the renames a crash interrupted between a row's
 * commit and its file's move into place. Runs once at start-up, before the server listens, and
 * then periodically.
 */
import type { AppContext } from './context.js';
import { repeatEvery } from './periodic.js';

export interface PartSweeperConfig {
  /** A part untouched for this long is abandoned, ms. */
  maxAgeMs: number;
  /** Time between passes, ms. */
  intervalMs: number;
}

export type PartSweepCounts = { removed: number; recovered: number };

/** A quarter of the age limit, between 1 s and 1 h: a part never outlives its limit by much. */
export function partSweeperConfig(ctx: Pick<AppContext, 'config'>): PartSweeperConfig {
  const maxAgeMs = ctx.config.uploadPartMaxAgeSeconds * 1000;
  return { maxAgeMs, intervalMs: Math.min(3_600_000, Math.max(1000, maxAgeMs / 4)) };
}

export interface PartSweeper {
  runOnce(): Promise<PartSweepCounts>;
  stop(): Promise<void>;
}

/** Starts the periodic passes (the first after one interval); `runOnce` runs one now. */
export function createPartSweeper(ctx: AppContext, config: PartSweeperConfig): PartSweeper {
  const runOnce = () =>
    ctx.storage.sweepParts({
      maxAgeMs: config.maxAgeMs,
      committed: async (relPath) => {
        const row = await ctx
          .knex('files')
          .where({ rel_path: relPath })
          .orderBy('created_at', 'desc')
          .first('size_bytes', 'sha256');
        return row ? { sizeBytes: Number(row.size_bytes), sha256: row.sha256 as string } : undefined;
      },
    });

  const loop = repeatEvery(
    config.intervalMs,
    async () => {
      const counts = await runOnce();
      if (counts.removed + counts.recovered > 0) ctx.logger.info(counts, 'swept unfinished uploads');
    },
    (err) =>
      ctx.logger.error({ err, task: 'sweep unfinished uploads' }, 'part sweeper pass failed; will retry'),
  );

  return { runOnce, stop: loop.stop };
}
