import type { Knex } from 'knex';
import type { Migration } from './index.js';

/** The engine each serving worker generates with (`transformers`, `vllm`), as its claims say. */
export const servingBackend: Migration = {
  name: '010_serving_backend',
  async up(knex: Knex) {
    await knex.raw('ALTER TABLE serving_workers ADD COLUMN backend text');
  },
  async down(knex: Knex) {
    await knex.raw('ALTER TABLE serving_workers DROP COLUMN backend');
  },
};
