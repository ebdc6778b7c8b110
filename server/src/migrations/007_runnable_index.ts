import type { Knex } from 'knex';
import type { Migration } from './index.js';

/**
 * Claims read pending jobs in priority order: a partial index in that order lets the claim take the
 * first one that fits without reading and sorting every pending row, as long as the statistics know
 * how many rows are pending (queue/statistics.ts keeps them fresh after a burst).
 */
export const runnableIndex: Migration = {
  name: '007_runnable_index',
  async up(knex: Knex) {
    await knex.raw(
      `CREATE INDEX jobs_runnable ON jobs (priority DESC, run_at, created_at) WHERE status = 'pending'`,
    );
  },
  async down(knex: Knex) {
    await knex.raw('DROP INDEX jobs_runnable');
  },
};
