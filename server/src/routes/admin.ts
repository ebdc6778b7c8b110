import type { Request } from 'express';
import { isOperator } from '../auth.js';
import { dateTimeMillis } from '../date-time.js';
import { badRequest, conflict, forbidden } from '../errors.js';
import { type BodyOf, isAdmin, page, pathParam, type Routes, type Schemas, tenantOf } from '../http.js';
import { createApiKey, listKeys, revokeApiKey } from '../services/api-keys.js';

/**
 * The tenant whose keys the caller may manage: undefined for the operator (every tenant and the
 * worker tokens), the caller's own for another admin key; anyone else is refused.
 */
function keyScope(req: Request): string | undefined {
  const tenantId = tenantOf(req);
  if (!isAdmin(req)) throw forbidden('Only admin keys may manage API keys.');
  return isOperator(req.principal) ? undefined : tenantId;
}

/** A tenant admin naming another tenant is refused, not answered with an empty page. */
function checkScope(scope: string | undefined, tenantId: string | undefined, param: string): void {
  if (scope !== undefined && tenantId !== undefined && tenantId !== scope) {
    throw forbidden(`Your admin key manages only tenant "${scope}"'s keys.`, param);
  }
}

function futureDate(value: string | undefined): Date | undefined {
  if (value === undefined) return undefined;
  // read as Postgres reads it (the date-time format took it); `new Date` reads `+05` as no date
  const at = new Date(dateTimeMillis(value));
  if (!(at.getTime() > Date.now())) throw badRequest('expires_at must be in the future.', 'expires_at');
  return at;
}

export const adminRoutes: Routes = {
  async listApiKeys(req, res, ctx) {
    const scope = keyScope(req);
    const tenantId = req.query.tenant_id as string | undefined;
    checkScope(scope, tenantId, 'tenant_id');
    const list = await listKeys(
      ctx.knex,
      {
        tenantId: scope ?? tenantId,
        kind: req.query.kind as 'user' | 'worker' | undefined,
        includeInactive: String(req.query.include_inactive) === 'true',
      },
      page(req),
    );
    res.json(list satisfies Schemas['ApiKeyList']);
  },

  async createApiKey(req, res, ctx) {
    const scope = keyScope(req);
    const body = req.body as BodyOf<'createApiKey'>;
    const expiresAt = futureDate(body.expires_at);
    if (body.kind === 'worker') {
      if (scope !== undefined) throw forbidden('Only the operator may create worker tokens.', 'kind');
      if (body.tenant_id !== undefined) throw badRequest('Worker tokens belong to no tenant.', 'tenant_id');
      if (body.admin) throw badRequest('Worker tokens cannot be admin keys.', 'admin');
      res.status(201).json(
        (await createApiKey(ctx.knex, {
          kind: 'worker',
          name: body.name,
          expiresAt,
        })) satisfies Schemas['CreatedApiKey'],
      );
      return;
    }
    checkScope(scope, body.tenant_id, 'tenant_id');
    const created = await createApiKey(ctx.knex, {
      kind: 'user',
      tenantId: body.tenant_id ?? tenantOf(req),
      admin: body.admin,
      name: body.name,
      expiresAt,
    });
    res.status(201).json(created satisfies Schemas['CreatedApiKey']);
  },

  async revokeApiKey(req, res, ctx) {
    const scope = keyScope(req);
    const keyId = pathParam(req, 'key_id');
    // An admin locking itself out by mistake (its only key, say) cannot be undone over the API.
    if (req.principal?.keyId === keyId) {
      throw conflict('A key cannot revoke itself; revoke it with another admin key.', 'conflict', 'key_id');
    }
    res.json((await revokeApiKey(ctx.knex, keyId, scope)) satisfies Schemas['ApiKey']);
  },
};
