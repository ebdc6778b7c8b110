import { createCipheriv, createDecipheriv, createHmac, randomBytes } from 'node:crypto';
import { chmod, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Knex } from 'knex';
import type { Config } from './config.js';

/**
 * Job secrets (hub tokens, teacher API keys) at rest: one AES-256-GCM envelope per job in
 * `jobs.secrets`. The job id is the additional authenticated data, so an envelope copied onto
 * another job does not open. Only the claim answer to the leased worker carries them in clear;
 * the database erases them when the job ends (migration 002's trigger).
 */
export interface SealedSecrets {
  /** Envelope format version. */
  v: 1;
  iv: string;
  tag: string;
  data: string;
}

const KEY_FILE = 'secrets-key';

export class SecretBox {
  constructor(private readonly key: Buffer) {
    if (key.length !== 32) throw new Error('The secrets key must be 32 bytes.');
  }

  /** Seals `secrets` for job `jobId`; nothing to seal gives null (the column's "no secrets"). */
  seal(jobId: string, secrets: Record<string, unknown> | undefined): SealedSecrets | null {
    if (!secrets || Object.keys(secrets).length === 0) return null;
    const iv = randomBytes(12);
    const cipher = createCipheriv('aes-256-gcm', this.key, iv).setAAD(Buffer.from(jobId));
    const data = Buffer.concat([cipher.update(JSON.stringify(secrets), 'utf8'), cipher.final()]);
    return {
      v: 1,
      iv: iv.toString('base64'),
      tag: cipher.getAuthTag().toString('base64'),
      data: data.toString('base64'),
    };
  }

  /** Names the key without revealing it: servers of one database compare it (checkSecretsKey). */
  fingerprint(): string {
    return createHmac('sha256', this.key).update('tunery secrets key fingerprint').digest('hex').slice(0, 32);
  }

  /** The secrets of job `jobId`; throws SecretsUnreadable when the envelope does not open with this key. */
  open(jobId: string, sealed: SealedSecrets | null): Record<string, unknown> {
    if (!sealed) return {};
    if (!isSealed(sealed)) throw new SecretsUnreadable(jobId);
    try {
      const decipher = createDecipheriv('aes-256-gcm', this.key, Buffer.from(sealed.iv, 'base64'))
        .setAAD(Buffer.from(jobId))
        .setAuthTag(Buffer.from(sealed.tag, 'base64'));
      const clear = Buffer.concat([decipher.update(Buffer.from(sealed.data, 'base64')), decipher.final()]);
      return JSON.parse(clear.toString('utf8')) as Record<string, unknown>;
    } catch {
      throw new SecretsUnreadable(jobId);
    }
  }
}

export class SecretsUnreadable extends Error {
  constructor(jobId: string) {
    super(
      `The secrets of job ${jobId} cannot be decrypted with this server's key (TUNERY_SECRETS_KEY ` +
        "or the data directory's secrets-key changed); create the job again.",
    );
  }
}

const isSealed = (value: unknown): value is SealedSecrets =>
  Boolean(value) && typeof value === 'object' && (value as { v?: unknown }).v === 1;

/** `TUNERY_SECRETS_KEY` as given: base64 of exactly 32 bytes. */
export function parseSecretsKey(raw: string): Buffer {
  const key = Buffer.from(raw, 'base64');
  if (key.length !== 32 || key.toString('base64') !== raw.replace(/\s/g, '')) {
    throw new Error('TUNERY_SECRETS_KEY must be 32 bytes in base64 (openssl rand -base64 32).');
  }
  return key;
}

/**
 * The configured key, else the data directory's `secrets-key`, created (0600) on first use. The
 * exclusive create makes two processes starting at once agree on one key.
 */
export async function loadSecretsKey(config: Pick<Config, 'secretsKey' | 'dataDir'>): Promise<Buffer> {
  if (config.secretsKey) return parseSecretsKey(config.secretsKey);
  const file = join(config.dataDir, KEY_FILE);
  try {
    await writeFile(file, `${randomBytes(32).toString('base64')}\n`, { mode: 0o600, flag: 'wx' });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  }
  await chmod(file, 0o600);
  return parseSecretsKey((await readFile(file, 'utf8')).trim());
}

/** Seals secrets that an older server stored in clear (before migration 002); returns how many. */
export async function sealPlaintextSecrets(knex: Knex, box: SecretBox): Promise<number> {
  const rows = (await knex('jobs')
    .whereNotNull('secrets')
    .whereRaw(`secrets->>'v' IS NULL`)
    .select('id', 'secrets')) as { id: string; secrets: Record<string, unknown> }[];
  for (const row of rows) {
    const sealed = box.seal(row.id, row.secrets);
    await knex('jobs')
      .where({ id: row.id })
      .update({ secrets: sealed ? JSON.stringify(sealed) : null });
  }
  return rows.length;
}

const KEY_SETTING = 'secrets_key_fingerprint';

/**
 * Records this server's key in the database on first start, and refuses a different one after:
 * a server with another key would fail every job whose secrets another server sealed. `rotate`
 * (TUNERY_SECRETS_KEY_ROTATE) adopts the new key; jobs sealed with the old one then fail at claim.
 */
export async function checkSecretsKey(knex: Knex, box: SecretBox, rotate: boolean): Promise<void> {
  const fingerprint = box.fingerprint();
  await knex('settings').insert({ name: KEY_SETTING, value: fingerprint }).onConflict('name').ignore();
  const stored = (await knex('settings').where({ name: KEY_SETTING }).first('value')) as { value: string };
  if (stored.value === fingerprint) return;
  if (!rotate) {
    throw new Error(
      "This server's secrets key (TUNERY_SECRETS_KEY, or the data directory's secrets-key) is not the " +
        "one this database's job secrets are sealed with. Give every server of one database the same " +
        'TUNERY_SECRETS_KEY; if the old key is lost, start once with TUNERY_SECRETS_KEY_ROTATE=1 (jobs ' +
        'holding secrets sealed with the old key then fail when claimed).',
    );
  }
  await knex('settings')
    .where({ name: KEY_SETTING })
    .update({ value: fingerprint, updated_at: knex.fn.now() });
}
