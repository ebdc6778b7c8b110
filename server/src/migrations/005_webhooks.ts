import type { Knex } from 'knex';
import type { Migration } from './index.js';

/**
 * Webhooks: endpoints a tenant registers to hear of jobs that end, and one delivery row per
 * (endpoint, job) — the delivery log, and the retry queue of deliveries not yet accepted.
 */
export const webhooks: Migration = {
  name: '005_webhooks',
  async up(knex: Knex) {
    await knex.schema.createTable('webhooks', (t) => {
      t.text('id').primary();
      t.text('tenant_id').notNullable().references('tenants.id');
      t.text('url').notNullable();
      t.specificType('events', 'text[]').notNullable();
      t.text('description').nullable();
      // The signing secret, sealed with the server's secrets key (the webhook id is the AAD).
      t.jsonb('secret').notNullable();
      t.timestamp('created_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
      t.index(['tenant_id', 'created_at']);
    });
    await knex.schema.createTable('webhook_deliveries', (t) => {
      t.text('id').primary();
      t.text('webhook_id').notNullable().references('webhooks.id').onDelete('CASCADE');
      t.text('tenant_id').notNullable();
      t.text('job_id').notNullable().references('jobs.id').onDelete('CASCADE');
      t.text('event').notNullable();
      t.text('status').notNullable(); // pending | delivered | failed
      t.integer('attempts').notNullable().defaultTo(0);
      t.timestamp('next_attempt_at', { useTz: true }).notNullable();
      t.integer('last_status_code').nullable();
      t.text('last_error').nullable();
      t.timestamp('created_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
      t.timestamp('delivered_at', { useTz: true }).nullable();
      t.unique(['webhook_id', 'job_id']);
      t.index(['status', 'next_attempt_at']);
    });
  },
  async down(knex: Knex) {
    await knex.schema.dropTable('webhook_deliveries');
    await knex.schema.dropTable('webhooks');
  },
};
