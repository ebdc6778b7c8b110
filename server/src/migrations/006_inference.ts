import type { Knex } from 'knex';
import type { Migration } from './index.js';

/**
 * Inference requests in flight (one row from the caller's request until its last token, then
 * deleted: nothing grows per request), the workers that serve them, and the adapters they hold. UNLOGGED: after a crash
 * there is nobody left waiting for an in-flight request, so it need not survive one.
 */
export const inference: Migration = {
  name: '006_inference',
  async up(knex: Knex) {
    await knex.raw(`
      CREATE UNLOGGED TABLE inference_requests (
        id text PRIMARY KEY,
        tenant_id text NOT NULL,
        token text NOT NULL,
        payload jsonb NOT NULL,
        -- Set for requests only one worker may take (unloading what it holds).
        for_worker text,
        status text NOT NULL DEFAULT 'queued',
        worker_id text,
        created_at timestamptz NOT NULL DEFAULT now(),
        claimed_at timestamptz
      )`);
    await knex.raw(
      `CREATE INDEX inference_requests_queued ON inference_requests (created_at) WHERE status = 'queued'`,
    );
    await knex.raw(`
      CREATE UNLOGGED TABLE serving_workers (
        worker_id text PRIMARY KEY,
        last_seen_at timestamptz NOT NULL
      )`);
    // Which serving worker holds which adapter in memory (after POST /v1/adapters/{name}/load).
    await knex.schema.createTable('adapter_placements', (t) => {
      t.text('tenant_id').notNullable();
      t.text('adapter_name').notNullable();
      t.text('worker_id').notNullable();
      t.timestamp('loaded_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
      t.primary(['tenant_id', 'adapter_name', 'worker_id']);
    });
  },
  async down(knex: Knex) {
    await knex.schema.dropTable('adapter_placements');
    await knex.raw('DROP TABLE serving_workers');
    await knex.raw('DROP TABLE inference_requests');
  },
};
