import { createHash } from 'node:crypto';
import type { Request } from 'express';
import type { Knex } from 'knex';
import { ApiError, type ErrorCode } from './errors.js';
import { keepSentBody } from './http.js';
import { newId, newSecret } from './ids.js';
import { type PreparedStatement, runPrepared } from './prepared.js';

/** Who is calling: a user key bound to a tenant, or a worker token. */
export type Principal =
  | { kind: 'user'; keyId: string; tenantId: string; admin: boolean }
  | { kind: 'worker'; keyId: string };

/**
 * The operator's tenant: its admin keys (the first one is made at first start) manage every
 * tenant's keys and the worker tokens; other tenants' admin keys manage only their own.
 */
export const OPERATOR_TENANT = 'default';

export const isOperator = (principal: Principal | undefined): boolean =>
  principal?.kind === 'user' && principal.admin && principal.tenantId === OPERATOR_TENANT;

/** One row of `api_keys`; `hash` is the sha256 of the secret, which itself is never stored. */
export interface KeyRow {
  id: string;
  kind: 'user' | 'worker';
  tenant_id: string | null;
  admin: boolean;
  hash: string;
  prefix: string;
  name: string | null;
  created_at: Date;
  expires_at: Date | null;
  revoked_at: Date | null;
}

export type NewKey =
  | { kind: 'user'; tenantId: string; admin?: boolean; name?: string; expiresAt?: Date }
  | { kind: 'worker'; name?: string; expiresAt?: Date };

const hashSecret = (secret: string) => createHash('sha256').update(secret).digest('hex');

export async function ensureTenant(knex: Knex, tenantId: string): Promise<void> {
  await knex('tenants').insert({ id: tenantId }).onConflict('id').ignore();
}

/** Creates a key; answers its row and its secret, which is shown this once (only the hash is stored). */
export async function insertKey(knex: Knex, opts: NewKey): Promise<{ row: KeyRow; secret: string }> {
  const secret = newSecret(opts.kind === 'user' ? 'tk' : 'tw');
  if (opts.kind === 'user') await ensureTenant(knex, opts.tenantId);
  const [row] = (await knex('api_keys')
    .insert({
      id: newId('key'),
      tenant_id: opts.kind === 'user' ? opts.tenantId : null,
      kind: opts.kind,
      admin: opts.kind === 'user' ? Boolean(opts.admin) : false,
      hash: hashSecret(secret),
      prefix: secret.slice(0, 7),
      name: opts.name ?? null,
      expires_at: opts.expiresAt ?? null,
    })
    .returning('*')) as KeyRow[];
  return { row: row!, secret };
}

/** Creates a key and returns its secret. */
export async function createKey(knex: Knex, opts: NewKey): Promise<string> {
  return (await insertKey(knex, opts)).secret;
}

export async function hasAnyKey(knex: Knex): Promise<boolean> {
  const row = await knex('api_keys').where({ kind: 'user' }).whereNull('revoked_at').first('id');
  return Boolean(row);
}

const unauthorized = (message: string, code: ErrorCode = 'unauthorized') =>
  new ApiError(401, code, message, null, { 'WWW-Authenticate': 'Bearer' });

/** A request without a well-formed `Authorization: Bearer …`. */
export const missingKey = () => unauthorized('Missing API key: send "Authorization: Bearer <key>".');

/**
 * Recently seen keys, so an authenticated request costs one database round trip instead of two.
 * Entries live KEY_CACHE_MS: a key revoked through this process's API is evicted at once (see
 * forgetCachedKey); one revoked by another process stops working here within KEY_CACHE_MS.
 * Unknown keys are never cached, so a new key works at once; expiry is checked on every use.
 */
export const KEY_CACHE_MS = 30_000;
const KEY_CACHE_MAX = 10_000;
const keyCache = new Map<string, { row: KeyRow; until: number }>();

/** Evicts a revoked key from this process's cache, so revocation here takes effect immediately. */
export function forgetCachedKey(keyId: string): void {
  for (const [hash, entry] of keyCache) if (entry.row.id === keyId) keyCache.delete(hash);
}

/** The key lookup of every authenticated request the cache misses: prepared, KeyRow's columns only. */
const KEY_BY_HASH: PreparedStatement = {
  name: 'api_key_by_hash',
  text: 'SELECT id, kind, tenant_id, admin, hash, prefix, name, created_at, expires_at, revoked_at FROM api_keys WHERE hash = $1',
};

async function findKey(knex: Knex, hash: string): Promise<KeyRow | undefined> {
  const cached = keyCache.get(hash);
  if (cached && cached.until > Date.now()) return cached.row;
  const [row] = await runPrepared<KeyRow>(knex, KEY_BY_HASH, [hash]);
  if (!row) return undefined;
  // Revoked keys are looked up again each time (so the answer can say why), never cached.
  if (row.revoked_at) return row;
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
  if (!match) throw missingKey();
  const row = await findKey(knex, hashSecret(match[1]!));
  if (!row) throw unauthorized('Invalid API key.');
  if (row.revoked_at) throw unauthorized('This API key was revoked.', 'api_key_revoked');
  if (row.expires_at && new Date(row.expires_at).getTime() <= Date.now()) {
    throw unauthorized(
      `This API key expired at ${new Date(row.expires_at).toISOString()}.`,
      'api_key_expired',
    );
  }
  if (row.kind !== want) {
    throw unauthorized(
      want === 'worker' ? 'This endpoint takes a worker token.' : 'Worker tokens cannot call user endpoints.',
    );
  }
  return row.kind === 'user'
    ? { kind: 'user', keyId: row.id, tenantId: row.tenant_id!, admin: row.admin }
    : { kind: 'worker', keyId: row.id };
}

/**
 * Why authentication refused a request. The spec validator rewraps a security handler's error as
 * a bare 401, losing its code (`api_key_expired`…) and headers; the error handler answers this.
 */
const authFailures = new WeakMap<Request, unknown>();

export const authFailureOf = (req: Request): unknown => authFailures.get(req);

/** The spec's security schemes (openapi.yaml `securitySchemes`) and the principal each admits. */
export const SCHEME_PRINCIPALS = { apiKey: 'user', workerToken: 'worker' } as const satisfies Record<
  string,
  Principal['kind']
>;
export type SecurityScheme = keyof typeof SCHEME_PRINCIPALS;

export const isSecurityScheme = (name: string): name is SecurityScheme =>
  Object.hasOwn(SCHEME_PRINCIPALS, name);

/**
 * The security handler of both validators (app.ts, bound-validator.ts): sets `req.principal`, or
 * records why not and throws. A user's body is then copied as sent (keepSentBody): only once the
 * caller is known, so an anonymous one never makes the server copy anything.
 */
export async function authenticateRequest(knex: Knex, req: Request, scheme: SecurityScheme): Promise<true> {
  try {
    req.principal = await authenticate(knex, req.headers.authorization, SCHEME_PRINCIPALS[scheme]);
  } catch (err) {
    authFailures.set(req, err);
    throw err;
  }
  if (req.principal.kind === 'user') keepSentBody(req);
  return true;
}
