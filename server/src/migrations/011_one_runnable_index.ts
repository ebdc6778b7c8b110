import type { Knex } from 'knex';
import type { Migration } from './index.js';

/**
 * 001 made `jobs_claimable` and 007 made `jobs_runnable`, the same index twice (claim order over
 * pending jobs): every job's insert and every status change wrote both. 007's stays.
 */
export const oneRunnableIndex: Migration = {
  name: '011_one_runnable_index',
  async up(knex: Knex) {
    await knex.raw('DROP INDEX IF EXISTS jobs_claimable');
  },
  async down(knex: Knex) {
    await knex.raw(
      `CREATE INDEX jobs_claimable ON jobs (priority DESC, run_at, created_at) WHERE status = 'pending'`,
    );
  },
};
