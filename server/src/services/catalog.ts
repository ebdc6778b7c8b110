import type { Knex } from 'knex';

/** Seeds the shipped base-model catalog entries (idempotent). */
export async function seedCatalog(_knex: Knex): Promise<void> {}
