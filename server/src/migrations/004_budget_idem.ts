import type { Knex } from 'knex';
import type { Migration } from './index.js';

/**
 * Budget reservations: each job holds its estimated cost against the tenant's limit while it is
 * pending or running (what it has not accrued yet counts as spent), so concurrent creates cannot
 * all pass the budget check.
 */
export const budgetReservations: Migration = {
  name: '004_budget_idem',
  async up(knex: Knex) {
    await knex.schema.alterTable('jobs', (t) => {
      t.decimal('cost_reserved', 14, 4).notNullable().defaultTo(0);
    });
  },
  async down(knex: Knex) {
    await knex.schema.alterTable('jobs', (t) => {
      t.dropColumn('cost_reserved');
    });
  },
};
