import { createHash } from 'node:crypto';
import type { Request } from 'express';
import type { Knex } from 'knex';
import type { AppContext } from '../context.js';
import { ApiError } from '../errors.js';
import { tenantOf } from '../http.js';
import { type IdPrefix, newId } from '../ids.js';

/** JSON with sorted keys, so two equal bodies hash the same whatever their key order. */
function stableJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(stableJson).join(',')}]`;
  if (value && typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>)
      .filter(([k, v]) => k !== 'idempotency_key' && v !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : 1));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${stableJson(v)}`).join(',')}}`;
  }
  return JSON.stringify(value ?? null);
}

/** The request's idempotency key: the body's `idempotency_key`, else the `Idempotency-Key` header. */
export function idempotencyKeyOf(req: Request): string | undefined {
  const fromBody = (req.body as { idempotency_key?: unknown } | undefined)?.idempotency_key;
  if (typeof fromBody === 'string' && fromBody) return fromBody;
  const header = req.headers['idempotency-key'];
  return typeof header === 'string' && header ? header : undefined;
}

/**
 * Runs a creating operation at most once per (tenant, scope, key). The resource id is chosen first
 * and reserved with the key, so a concurrent repeat finds it; `create(id)` must create the object
 * with exactly that id. Returns the id and whether this call was a repeat. A repeat whose body differs
 * is `409 idempotency_conflict`; one that arrives before the first call's object exists is
 * `409 request_in_progress` (clients retry it), until the first call is older than
 * `idempotencyStaleSeconds`: then it is taken to have died, and the repeat creates the object itself.
 */
export async function idempotent(
  ctx: AppContext,
  req: Request,
  scope: string,
  /** A prefix for a fresh id, or the id itself for objects named by the caller (templates). */
  target: IdPrefix | { id: string },
  create: (id: string) => Promise<void>,
  body: unknown = req.body,
): Promise<{ id: string; repeat: boolean }> {
  const key = idempotencyKeyOf(req);
  const id = typeof target === 'string' ? newId(target) : target.id;
  if (!key) {
    await create(id);
    return { id, repeat: false };
  }
  const tenantId = tenantOf(req);
  const requestHash = createHash('sha256')
    .update(stableJson(body ?? {}))
    .digest('hex');
  const mine = { tenant_id: tenantId, scope, key, resource_id: id };
  const reserved = await ctx
    .knex('idempotency_keys')
    .insert({ ...mine, request_hash: requestHash })
    .onConflict(['tenant_id', 'scope', 'key'])
    .ignore()
    .returning('resource_id');
  if (reserved.length > 0 || (await takeOverStaleKey(ctx, { ...mine, request_hash: requestHash }))) {
    try {
      await create(id);
    } catch (err) {
      // The key was never used for a real object: free it so the client can retry.
      await ctx.knex('idempotency_keys').where(mine).delete();
      throw err;
    }
    // Only now does the object exist: from here on a repeat may answer it. (Matched on our id too: a
    // create so slow that its key was taken over must not complete the newcomer's.)
    await ctx.knex('idempotency_keys').where(mine).update({ completed_at: ctx.knex.fn.now() });
    return { id, repeat: false };
  }
  const existing = await ctx.knex('idempotency_keys').where({ tenant_id: tenantId, scope, key }).first();
  const inProgress = () =>
    new ApiError(409, 'request_in_progress', 'A request with this idempotency key is in progress; retry.');
  // Gone again: the first call failed and freed the key.
  if (!existing) throw inProgress();
  if (existing.request_hash !== requestHash) {
    throw new ApiError(
      409,
      'idempotency_conflict',
      'This idempotency key was already used with a different request body.',
      'idempotency_key',
    );
  }
  // Reserved, but the first call has not finished creating its object yet.
  if (!existing.completed_at) throw inProgress();
  return { id: existing.resource_id as string, repeat: true };
}

/**
 * A key whose create started longer ago than any create takes and never completed belongs to a
 * request that died mid-way (the process crashed, the database connection broke): no object was
 * made, so the key is as good as free for a repeat of that request. Takes it over for this request
 * when its body is the same, atomically (of two newcomers only one wins); true when it did.
 */
async function takeOverStaleKey(
  ctx: AppContext,
  row: { tenant_id: string; scope: string; key: string; resource_id: string; request_hash: string },
): Promise<boolean> {
  const taken = await ctx
    .knex('idempotency_keys')
    .where({ tenant_id: row.tenant_id, scope: row.scope, key: row.key })
    .whereNull('completed_at')
    // only the same request may finish what died: another body under this key stays a conflict
    .andWhere('request_hash', row.request_hash)
    // the database clock, like every other deadline
    .andWhereRaw('created_at < now() - make_interval(secs => ?)', [ctx.config.idempotencyStaleSeconds])
    .update({ resource_id: row.resource_id, request_hash: row.request_hash, created_at: ctx.knex.fn.now() })
    .returning('resource_id');
  return taken.length > 0;
}

/** Forgets the keys that created an object, once it is deleted: a repeat then creates it anew. */
export async function forgetIdempotentCreates(db: Knex, tenantId: string, resourceId: string): Promise<void> {
  await db('idempotency_keys').where({ tenant_id: tenantId, resource_id: resourceId }).delete();
}
