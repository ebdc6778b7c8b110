/**
 * A shortcut past Express's router for the hot operations. Express tries the spec's paths one
 * route layer at a time, in routeOrder: a worker's claim or a job's GET walked dozens of layers
 * before its own. The table keeps the same paths, in the same order, grouped by how many segments
 * they have, and matches them by Express's rules (case-insensitive, one optional trailing slash,
 * each parameter a whole non-empty segment, percent-decoded). So the route it finds is the one
 * Express would have taken, found among the few paths as long as the request's.
 *
 * It answers only where it was given handlers for the path and method. Everything else — another
 * operation, a method the path lacks (405), a parameter that does not decode (400) — goes on to
 * Express's routes, which hold every operation, the shortcut's ones included.
 */
import type { NextFunction, Request, RequestHandler, Response } from 'express';

/** One spec path (Express syntax, `/v1/jobs/:job_id`) and the handlers the table runs, by method (any case). */
export interface TablePath {
  expressPath: string;
  handlers: ReadonlyMap<string, readonly RequestHandler[]>;
}

interface CompiledPath {
  pattern: RegExp;
  params: string[];
  handlers: ReadonlyMap<string, readonly RequestHandler[]>;
}

/** Segments of a path, not counting one trailing slash: `/v1/jobs/` and `/v1/jobs` have two. */
const segmentCount = (path: string) => path.replace(/(.)\/$/, '$1').split('/').length - 1;

const escapeRegExp = (text: string) => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** A segment the table matches as Express does: a whole parameter, or text with no path-to-regexp syntax. */
const PLAIN_SEGMENT = /^(:\w+|[^:{}()[\]*?+!\\]*)$/;

function compilePath({ expressPath, handlers }: TablePath): CompiledPath {
  const params: string[] = [];
  const segments = expressPath.split('/').map((segment) => {
    if (!PLAIN_SEGMENT.test(segment))
      throw new Error(`route table: ${expressPath} has a segment it cannot match as Express would`);
    if (!segment.startsWith(':')) return escapeRegExp(segment);
    params.push(segment.slice(1));
    return '([^/]+)';
  });
  const byMethod = new Map([...handlers].map(([method, chain]) => [method.toUpperCase(), chain]));
  return { pattern: new RegExp(`^${segments.join('/')}/?$`, 'i'), params, handlers: byMethod };
}

/** Decoded path parameters, or undefined when one is not valid percent-encoding. */
function decodeParams(names: string[], match: RegExpExecArray): Record<string, string> | undefined {
  const params: Record<string, string> = {};
  try {
    for (const [i, name] of names.entries()) params[name] = decodeURIComponent(match[i + 1]!);
  } catch {
    return undefined;
  }
  return params;
}

/**
 * Runs a route's handlers in turn as Express 5 does: each calls `next()` to go on or `next(err)` to
 * fail; a throw or a rejected promise fails too. The last one answers, so none is left to call, and
 * none skips to another route (`next('route')`): the next route would be this one, in Express's router.
 */
function runHandlers(handlers: readonly RequestHandler[], req: Request, res: Response, fail: NextFunction) {
  let at = 0;
  const next = (err?: unknown) => {
    if (err === 'route' || err === 'router')
      return fail(new Error(`${req.method} ${req.path}: next('${err}') is not supported on a table route`));
    if (err) return fail(err);
    const handler = handlers[at++];
    if (!handler) return fail(new Error(`${req.method} ${req.path}: the route's last handler called next()`));
    try {
      const result: unknown = handler(req, res, next);
      if (result instanceof Promise)
        result.catch((rejected: unknown) => fail(rejected || new Error('Rejected promise')));
    } catch (thrown) {
      fail(thrown);
    }
  };
  next();
}

/**
 * The shortcut, as middleware. `paths` must be every path Express mounts, in the order it mounts
 * them (routeOrder): a path without handlers here still shadows the ones after it, as in Express.
 */
export function routeTable(paths: readonly TablePath[]): RequestHandler {
  const bySegments = new Map<number, CompiledPath[]>();
  for (const path of paths) {
    const count = segmentCount(path.expressPath);
    bySegments.set(count, [...(bySegments.get(count) ?? []), compilePath(path)]);
  }
  return (req, res, next) => {
    const path = req.path;
    for (const candidate of bySegments.get(segmentCount(path)) ?? []) {
      const match = candidate.pattern.exec(path);
      if (!match) continue;
      const handlers = candidate.handlers.get(req.method);
      const params = handlers && decodeParams(candidate.params, match);
      if (!handlers || !params) return next();
      req.params = params;
      return runHandlers(handlers, req, res, next);
    }
    next();
  };
}
