import type { Knex } from 'knex';
import type { Migration } from './index.js';

/**
 * A completion looks up what its job registered before (its adapter, its model) by the job's id.
 * The indexes it had for that, (tenant_id, job_id), lead with the tenant, as do models' list index
 * (tenant_id, created_at) and adapters' primary key (tenant_id, name), so those matched the lookup's
 * tenant condition too; a prepared statement's plan, made while the table was small, could take
 * models' list index and then read every model of the tenant on each completion (seen in bench
 * drains: up to 6,000 rows a job, Postgres's CPU per job up by half). Job ids are unique across
 * tenants: indexes on `job_id` alone serve the lookups, and the queries compare the tenant in a form
 * no index matches (complete.ts).
 */
export const outputLookupsByJob: Migration = {
  name: '013_output_lookups_by_job',
  async up(knex: Knex) {
    await knex.raw('DROP INDEX adapters_tenant_id_job_id_index');
    await knex.raw('CREATE INDEX adapters_job_id ON adapters (job_id)');
    await knex.raw('DROP INDEX models_tenant_id_job_id_index');
    await knex.raw('CREATE INDEX models_job_id ON models (job_id)');
  },
  async down(knex: Knex) {
    await knex.raw('DROP INDEX models_job_id');
    await knex.raw('CREATE INDEX models_tenant_id_job_id_index ON models (tenant_id, job_id)');
    await knex.raw('DROP INDEX adapters_job_id');
    await knex.raw('CREATE INDEX adapters_tenant_id_job_id_index ON adapters (tenant_id, job_id)');
  },
};
