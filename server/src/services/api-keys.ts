/**
 * Key management, shared by the admin API (routes/admin.ts) and the CLI when no server is up:
 * list, create, revoke. Listings show a key's id and prefix, never its secret or hash.
 */
import type { Knex } from 'knex';
import { forgetCachedKey, insertKey, type KeyRow, type NewKey } from '../auth.js';
import { notFound } from '../errors.js';
import { iso, isoRequired, type Schemas } from '../http.js';
import { listPage, newestFirst } from './paging.js';

export interface KeyFilter {
  /** Only this tenant's keys (a tenant admin's scope); undefined: all tenants and worker tokens. */
  tenantId?: string;
  kind?: 'user' | 'worker';
  /** Also revoked and expired keys. */
  includeInactive?: boolean;
}

function keyStatus(row: KeyRow, now = Date.now()): Schemas['ApiKey']['status'] {
  if (row.revoked_at) return 'revoked';
  if (row.expires_at && new Date(row.expires_at).getTime() <= now) return 'expired';
  return 'active';
}

export function keyView(row: KeyRow): Schemas['ApiKey'] {
  return {
    id: row.id,
    kind: row.kind,
    tenant_id: row.tenant_id,
    admin: row.admin,
    name: row.name,
    prefix: row.prefix,
    status: keyStatus(row),
    created_at: isoRequired(row.created_at),
    expires_at: iso(row.expires_at),
    revoked_at: iso(row.revoked_at),
  };
}

function visibleKeys(knex: Knex, filter: KeyFilter): Knex.QueryBuilder {
  const query = knex('api_keys');
  if (filter.tenantId !== undefined) query.where({ tenant_id: filter.tenantId });
  if (filter.kind) query.where({ kind: filter.kind });
  if (!filter.includeInactive) {
    query.whereNull('revoked_at').where((q) => q.whereNull('expires_at').orWhereRaw('expires_at > now()'));
  }
  return query;
}

export function listKeys(knex: Knex, filter: KeyFilter, paging: { limit: number; offset: number }) {
  return listPage('keys', visibleKeys(knex, filter), paging, newestFirst(), (rows: KeyRow[]) =>
    rows.map(keyView),
  );
}

export async function createApiKey(knex: Knex, opts: NewKey): Promise<Schemas['CreatedApiKey']> {
  const { row, secret } = await insertKey(knex, opts);
  return { key: keyView(row), secret };
}

/**
 * Revokes key `keyId` (only within `tenantId` when given: another tenant's key is 404) and evicts
 * it from this process's key cache. A revoked key answers as it is.
 */
export async function revokeApiKey(
  knex: Knex,
  keyId: string,
  tenantId: string | undefined,
): Promise<Schemas['ApiKey']> {
  const scope = (q: Knex.QueryBuilder) => (tenantId === undefined ? q : q.where({ tenant_id: tenantId }));
  const [revoked] = (await scope(knex('api_keys').where({ id: keyId }).whereNull('revoked_at'))
    .update({ revoked_at: knex.fn.now() })
    .returning('*')) as KeyRow[];
  forgetCachedKey(keyId);
  const row = revoked ?? ((await scope(knex('api_keys').where({ id: keyId })).first()) as KeyRow | undefined);
  if (!row) throw notFound('API key', keyId, 'key_id', 'key_not_found');
  return keyView(row);
}
