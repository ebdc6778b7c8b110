import type { Knex } from 'knex';
import type { Migration } from './index.js';

/**
 * Worker downloads find the job by the lease token they present: indexed.
 *
 * Budget reservations: each job holds its estimated cost against the tenant's limit while it is
 * pending or running (what it has not accrued yet counts as spent), so concurrent creates cannot
 * all pass the budget check.
 */
export const budgetReservations: Migration = {
  name: '004_budget_idem',
  async up(knex: Knex) {
    await knex.schema.alterTable('jobs', (t) => {
      t.decimal('cost_reserved', 14, 4).notNullable().defaultTo(0);
      t.index(['lease_token'], 'jobs_lease_token');
    });
  },
  async down(knex: Knex) {
    await knex.schema.alterTable('jobs', (t) => {
      t.dropIndex(['lease_token'], 'jobs_lease_token');
      t.dropColumn('cost_reserved');
    });
  },
};
