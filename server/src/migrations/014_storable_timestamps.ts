import type { Knex } from 'knex';
import type { Migration } from './index.js';

/** Timestamps a client sent in, which the validators did not bound to years 0100–9999 before. */
const CLIENT_TIMESTAMPS: [table: string, column: string][] = [
  ['job_logs', 'ts'],
  ['job_metrics', 'ts'],
  ['job_events', 'ts'],
  ['trajectories', 'start_time'],
  ['trajectories', 'end_time'],
  ['api_keys', 'expires_at'],
];

/**
 * The spec's `date-time` now takes only instants in years 0100–9999 in UTC, in requests and in
 * answers (date-time.ts). A value stored before outside them would fail every answer that shows it
 * (a job's logs, a tenant's key list) with a 500: it is moved to the nearest instant inside, which
 * keeps a key's expiry meaning what it did (long past, or never). A full scan of each table, once.
 */
export const storableTimestamps: Migration = {
  name: '014_storable_timestamps',
  async up(knex: Knex) {
    for (const [table, column] of CLIENT_TIMESTAMPS) {
      await knex.raw(
        `UPDATE ?? SET ?? = CASE WHEN ?? < '0100-01-01T00:00:00Z' THEN '0100-01-01T00:00:00Z'::timestamptz
           ELSE '9999-12-31T23:59:59.999999Z'::timestamptz END
         WHERE ?? < '0100-01-01T00:00:00Z' OR ?? >= '10000-01-01T00:00:00Z'`,
        [table, column, column, column, column],
      );
    }
  },
  // the moved values are not kept: nothing to restore
  async down() {},
};
