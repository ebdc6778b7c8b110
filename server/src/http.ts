import type { NextFunction, Request, Response } from 'express';
import type { Principal } from './auth.js';
import type { AppContext } from './context.js';
import { ApiError, badRequest } from './errors.js';
import type { components, operations } from './generated/api.js';

export type Schemas = components['schemas'];
export type OperationId = keyof operations;

/** Request body type of an operation, from the generated spec types. */
export type BodyOf<Op extends OperationId> = operations[Op] extends {
  requestBody?: { content: { 'application/json': infer B } };
}
  ? B
  : never;

/** A route handler: the validator has already checked the request against the spec. */
export type Handler = (req: Request, res: Response, ctx: AppContext) => Promise<void>;
export type Routes = Partial<Record<OperationId, Handler>>;

declare global {
  namespace Express {
    interface Request {
      /** Set by the validator's security handlers (app.ts). */
      principal?: Principal;
    }
  }
}

/** The calling user's tenant; every user-facing query filters on it. */
export function tenantOf(req: Request): string {
  const principal = req.principal;
  if (principal?.kind !== 'user') throw new ApiError(401, 'unauthorized', 'A user API key is required.');
  return principal.tenantId;
}

export function isAdmin(req: Request): boolean {
  return req.principal?.kind === 'user' && req.principal.admin;
}

/** `tenant_id` (seed 000) may be sent, but only as the key's own tenant. */
export function checkTenantParam(req: Request, given: unknown): string {
  const tenant = tenantOf(req);
  if (given !== undefined && given !== tenant) {
    throw new ApiError(
      403,
      'permission_denied',
      "tenant_id does not match your API key's tenant.",
      'tenant_id',
    );
  }
  return tenant;
}

export function pathParam(req: Request, name: string): string {
  const value = req.params[name];
  if (typeof value !== 'string')
    throw new ApiError(400, 'invalid_request', `Missing path parameter ${name}.`, name);
  return value;
}

export function queryInt(req: Request, name: string, fallback: number): number {
  const value = req.query[name];
  if (value === undefined) return fallback;
  return Number(value);
}

/** `limit` and where the page starts: `offset` rows in, or `after` a page's `next_cursor` (not both). */
export function page(req: Request): { limit: number; offset: number; after?: string } {
  const after = typeof req.query.after === 'string' ? req.query.after : undefined;
  // req.query holds offset's default once validated; what the caller sent is in the URL.
  if (after !== undefined && new URL(req.originalUrl, 'http://host').searchParams.has('offset')) {
    throw badRequest('Give offset or after, not both.', 'after');
  }
  return { limit: queryInt(req, 'limit', 20), offset: queryInt(req, 'offset', 0), after };
}

/**
 * Keeps a copy of the JSON body as the caller sent it, before the validator fills in schema
 * defaults: handlers that layer settings (template < flat fields < nested objects) must see what
 * the caller chose, or a default would override a choice. Called by the security handler, after
 * authentication (auth.ts authenticateRequest).
 */
export function keepSentBody(req: Request): void {
  if (req.res && req.body && typeof req.body === 'object')
    req.res.locals.sentBody = structuredClone(req.body);
}

/**
 * The JSON body as the caller sent it, before the validator filled in defaults; typed as the
 * operation's body, whose defaulted fields may therefore be missing.
 */
export function sentBody<Op extends OperationId>(res: Response): BodyOf<Op> {
  return res.locals.sentBody as BodyOf<Op>;
}

/** Wraps an async handler so its rejection reaches the error middleware. */
export function wrap(handler: Handler, ctx: AppContext) {
  return (req: Request, res: Response, next: NextFunction) => {
    handler(req, res, ctx).catch(next);
  };
}

export const iso = (value: Date | string | null | undefined): string | null =>
  value == null ? null : new Date(value).toISOString();
export const isoRequired = (value: Date | string): string => new Date(value).toISOString();
