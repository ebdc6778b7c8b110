import { createHash } from 'node:crypto';
import type { Knex } from 'knex';
import { ApiError } from './errors.js';
import { newId, newSecret } from './ids.js';

/** Who is calling: a user key bound to a tenant, or a worker token. */
export type Principal =
  | { kind: 'user'; keyId: string; tenantId: string; admin: boolean }
  | { kind: 'worker'; keyId: string };

const hashSecret = (secret: string) => createHash('sha256').update(secret).digest('hex');

export async function ensureTenant(knex: Knex, tenantId: string): Promise<void> {
  await knex('tenants').insert({ id: tenantId }).onConflict('id').ignore();
}

/** Creates a key and returns its secret; only the hash is stored, so the secret is shown once. */
export async function createKey(
  knex: Knex,
  opts:
    | { kind: 'user'; tenantId: string; admin?: boolean; name?: string }
    | { kind: 'worker'; name?: string },
): Promise<string> {
  const secret = newSecret(opts.kind === 'user' ? 'tk' : 'tw');
  if (opts.kind === 'user') await ensureTenant(knex, opts.tenantId);
  await knex('api_keys').insert({
    id: newId('key'),
    tenant_id: opts.kind === 'user' ? opts.tenantId : null,
    kind: opts.kind,
    admin: opts.kind === 'user' ? Boolean(opts.admin) : false,
    hash: hashSecret(secret),
    prefix: secret.slice(0, 7),
    name: opts.name ?? null,
  });
  return secret;
}

export async function hasAnyKey(knex: Knex): Promise<boolean> {
  const row = await knex('api_keys').where({ kind: 'user' }).whereNull('revoked_at').first('id');
  return Boolean(row);
}

const unauthorized = (message: string) =>
  new ApiError(401, 'unauthorized', message, null, { 'WWW-Authenticate': 'Bearer' });

/**
 * Recently seen keys, so an authenticated request costs one database round trip instead of two.
 * Entries live KEY_CACHE_MS (a revoked key stops working within that); unknown keys are never
 * cached, so a new key works at once.
 */
const KEY_CACHE_MS = 30_000;
const KEY_CACHE_MAX = 10_000;
const keyCache = new Map<string, { row: KeyRow; until: number }>();

interface KeyRow {
  id: string;
  kind: 'user' | 'worker';
  tenant_id: string | null;
  admin: boolean;
}

async function findKey(knex: Knex, hash: string): Promise<KeyRow | undefined> {
  const cached = keyCache.get(hash);
  if (cached && cached.until > Date.now()) return cached.row;
  const row = (await knex('api_keys')
    .where({ hash })
    .whereNull('revoked_at')
    .first('id', 'kind', 'tenant_id', 'admin')) as KeyRow | undefined;
  if (!row) return undefined;
  if (keyCache.size >= KEY_CACHE_MAX) keyCache.clear();
  keyCache.set(hash, { row, until: Date.now() + KEY_CACHE_MS });
  return row;
}

/** Resolves `Authorization: Bearer …` to a principal of the wanted kind, or throws 401. */
export async function authenticate(
  knex: Knex,
  header: string | undefined,
  want: 'user' | 'worker',
): Promise<Principal> {
  const match = /^Bearer\s+(\S+)$/i.exec(header ?? '');
  if (!match) throw unauthorized('Missing API key: send "Authorization: Bearer <key>".');
  const row = await findKey(knex, hashSecret(match[1]!));
  if (!row) throw unauthorized('Invalid API key.');
  if (row.kind !== want) {
    throw unauthorized(
      want === 'worker' ? 'This endpoint takes a worker token.' : 'Worker tokens cannot call user endpoints.',
    );
  }
  return row.kind === 'user'
    ? { kind: 'user', keyId: row.id, tenantId: row.tenant_id!, admin: row.admin }
    : { kind: 'worker', keyId: row.id };
}
