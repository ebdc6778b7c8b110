import type { Knex } from 'knex';
import type { Migration } from './index.js';

/**
 * Gang scheduling (`num_nodes` > 1): the job's node count, and one row per worker that joined an
 * attempt's gang. While the gang forms, `rank` is null and `expires_at` ends the member's join
 * window; once all `num_nodes` joined, ranks are set (order of arrival) and `expires_at` is the
 * member's lease, which its heartbeats extend. Rank 0's `member_token` is the job's lease token.
 */
export const gangs: Migration = {
  name: '008_gangs',
  async up(knex: Knex) {
    await knex.raw('ALTER TABLE jobs ADD COLUMN num_nodes integer NOT NULL DEFAULT 1');
    await knex.raw(`
      CREATE TABLE job_gang_members (
        job_id text NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        attempt integer NOT NULL,
        worker_id text NOT NULL,
        member_token text NOT NULL UNIQUE,
        addr text NOT NULL,
        port integer NOT NULL,
        rank integer,
        joined_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        expires_at timestamptz NOT NULL,
        PRIMARY KEY (job_id, attempt, worker_id)
      )`);
    // the sweeper's look for members of running gangs whose lease lapsed
    await knex.raw('CREATE INDEX job_gang_members_leases ON job_gang_members (expires_at) WHERE rank > 0');
  },
  async down(knex: Knex) {
    await knex.raw('DROP TABLE job_gang_members');
    await knex.raw('ALTER TABLE jobs DROP COLUMN num_nodes');
  },
};
