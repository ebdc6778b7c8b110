import type { Knex } from 'knex';
import type { Migration } from './index.js';

const TERMINAL = `('completed', 'failed', 'cancelled')`;

/**
 * Job secrets are sealed (AES-256-GCM, see secrets.ts) and forgotten when a job ends; the sealing
 * key's fingerprint is kept in `settings`; API keys can expire.
 */
export const secretsKeys: Migration = {
  name: '002_secrets_keys',
  async up(knex: Knex) {
    // NULL: no secrets, or the job ended and they were erased.
    await knex.raw(`ALTER TABLE jobs ALTER COLUMN secrets DROP NOT NULL, ALTER COLUMN secrets DROP DEFAULT`);
    await knex.raw(`UPDATE jobs SET secrets = NULL WHERE secrets = '{}'::jsonb OR status IN ${TERMINAL}`);
    // One place erases secrets, whichever transition ends the job (complete, fail, cancel, the
    // rescuer, a claim that finds an input gone): a trigger, so no new transition can forget to.
    await knex.raw(`
      CREATE FUNCTION jobs_forget_secrets() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        NEW.secrets := NULL;
        RETURN NEW;
      END $$`);
    await knex.raw(`
      CREATE TRIGGER jobs_forget_secrets BEFORE UPDATE ON jobs FOR EACH ROW
      WHEN (NEW.status IN ${TERMINAL} AND NEW.secrets IS NOT NULL)
      EXECUTE FUNCTION jobs_forget_secrets()`);

    await knex.schema.alterTable('api_keys', (t) => {
      t.timestamp('expires_at', { useTz: true }).nullable();
    });

    // Server-wide facts every server of one database must agree on (the secrets key's fingerprint).
    await knex.schema.createTable('settings', (t) => {
      t.text('name').primary();
      t.text('value').notNullable();
      t.timestamp('updated_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
    });
  },
  async down(knex: Knex) {
    await knex.schema.dropTableIfExists('settings');
    await knex.schema.alterTable('api_keys', (t) => t.dropColumn('expires_at'));
    await knex.raw('DROP TRIGGER IF EXISTS jobs_forget_secrets ON jobs');
    await knex.raw('DROP FUNCTION IF EXISTS jobs_forget_secrets()');
    await knex.raw(`UPDATE jobs SET secrets = '{}'::jsonb WHERE secrets IS NULL`);
    await knex.raw(
      `ALTER TABLE jobs ALTER COLUMN secrets SET DEFAULT '{}', ALTER COLUMN secrets SET NOT NULL`,
    );
  },
};
