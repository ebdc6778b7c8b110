import type { Knex } from 'knex';
import type { Migration } from './index.js';

/**
 * Inference requests in flight (one row from the caller's request until its last token, then
 * deleted: nothing grows per request) and the workers that serve them. UNLOGGED: after a crash
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
  },
  async down(knex: Knex) {
    await knex.raw('DROP TABLE serving_workers');
    await knex.raw('DROP TABLE inference_requests');
  },
};
