import type { Knex } from 'knex';
import type { Migration } from './index.js';

/**
 * A paused job (OpenAI's fine-tuning pause) is a cancelled one that remembers it was paused: it
 * shows as `paused` there and resumes from its latest checkpoint, or from the start without one.
 */
export const paused: Migration = {
  name: '009_paused',
  async up(knex: Knex) {
    await knex.schema.alterTable('jobs', (t) => {
      t.timestamp('paused_at', { useTz: true }).nullable();
    });
  },
  async down(knex: Knex) {
    await knex.schema.alterTable('jobs', (t) => t.dropColumn('paused_at'));
  },
};
