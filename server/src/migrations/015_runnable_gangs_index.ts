import type { Knex } from 'knex';
import type { Migration } from './index.js';

/**
 * The claim of a worker that can join gangs reads the best pending gang job on its own (claim.ts:
 * without a lock, so it joins the gang another worker is joining instead of a lesser one). Over
 * `jobs_runnable` that read would pass every pending job of one node before finding none; this
 * index holds the pending gang jobs alone, in the same order.
 */
export const runnableGangsIndex: Migration = {
  name: '015_runnable_gangs_index',
  async up(knex: Knex) {
    await knex.raw(
      `CREATE INDEX jobs_runnable_gangs ON jobs (priority DESC, run_at, created_at)
       WHERE status = 'pending' AND num_nodes > 1`,
    );
  },
  async down(knex: Knex) {
    await knex.raw('DROP INDEX jobs_runnable_gangs');
  },
};
