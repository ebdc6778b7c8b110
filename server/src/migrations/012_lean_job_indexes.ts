import type { Knex } from 'knex';
import type { Migration } from './index.js';

/**
 * Every change of a job's status rewrites its row, and a rewritten row gets an entry in each of the
 * table's indexes whose predicate it meets. Three indexes held rows that no query looks up there:
 *
 * - `jobs_lease_token`: worker downloads look a running job up by its lease token; the index held
 *   every job, pending and finished ones included. Now only running jobs.
 * - `jobs_parent_job_id_index`: jobs are looked up by their parent (`parent_job_id = $1`); most
 *   jobs have none. Now only jobs with a parent.
 * - `job_events (job_id, dedupe_key)` unique: only events a worker sends carry a dedupe key (a
 *   re-sent batch is stored once); the server's own (`claimed`, `completed`…) have none. Now only
 *   events with a key, which `ON CONFLICT (job_id, dedupe_key) WHERE dedupe_key IS NOT NULL` names.
 *
 * A job's claim and completion write five fewer index entries.
 */
export const leanJobIndexes: Migration = {
  name: '012_lean_job_indexes',
  async up(knex: Knex) {
    await knex.raw('DROP INDEX jobs_lease_token');
    await knex.raw(`CREATE INDEX jobs_running_lease_token ON jobs (lease_token) WHERE status = 'running'`);
    await knex.raw('DROP INDEX jobs_parent_job_id_index');
    await knex.raw('CREATE INDEX jobs_parent_job_id ON jobs (parent_job_id) WHERE parent_job_id IS NOT NULL');
    await knex.raw('ALTER TABLE job_events DROP CONSTRAINT job_events_job_id_dedupe_key_unique');
    await knex.raw(
      'CREATE UNIQUE INDEX job_events_dedupe_key ON job_events (job_id, dedupe_key) WHERE dedupe_key IS NOT NULL',
    );
  },
  async down(knex: Knex) {
    await knex.raw('DROP INDEX job_events_dedupe_key');
    await knex.raw(
      'ALTER TABLE job_events ADD CONSTRAINT job_events_job_id_dedupe_key_unique UNIQUE (job_id, dedupe_key)',
    );
    await knex.raw('DROP INDEX jobs_parent_job_id');
    await knex.raw('CREATE INDEX jobs_parent_job_id_index ON jobs (parent_job_id)');
    await knex.raw('DROP INDEX jobs_running_lease_token');
    await knex.raw('CREATE INDEX jobs_lease_token ON jobs (lease_token)');
  },
};
