/**
 * A shortcut past Express's router for the hot operations. Express tries its middleware and then
 * the spec's paths one layer at a time, in routeOrder: a worker's claim or a job's GET walked
 * dozens of layers before its own, each a few function calls. The table keeps the same paths, in
 * the same order, grouped by how many segments they have, and matches them by Express's rules
 * (case-insensitive, one optional trailing slash, each parameter a whole non-empty segment,
 * percent-decoded). So the route it finds is the one Express would have taken, found among the few
 * paths as long as the request's.
 *
 * It sits in front of the app (serveTableFirst) and answers only where it was given handlers for
 * the path and method. Everything else — another operation, a method the path lacks (405), a
 * parameter that does not decode (400) — is the app's, whose routes hold every operation, the
 * shortcut's ones included.
 */
import { IncomingMessage, ServerResponse } from 'node:http';
import type { ErrorRequestHandler, Express, NextFunction, Request, RequestHandler, Response } from 'express';

/** A spec path (Express syntax, `/v1/jobs/:job_id`) and the handlers the table runs, by method (any case). */
export interface TablePath {
  expressPath: string;
  handlers: ReadonlyMap<string, readonly RequestHandler[]>;
}

interface CompiledPath {
  pattern: RegExp;
  params: string[];
  handlers: ReadonlyMap<string, readonly RequestHandler[]>;
}

/**
 * Segments of a path, not counting one trailing slash: `/v1/jobs/` and `/v1/jobs` have two. Counted
 * in place: it runs on every request.
 */
function segmentCount(path: string): number {
  let slashes = 0;
  for (let i = 0; i < path.length; i++) if (path.charCodeAt(i) === 0x2f) slashes++;
  const trailing = path.length > 1 && path.charCodeAt(path.length - 1) === 0x2f;
  return trailing ? slashes - 1 : slashes;
}

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
 * Runs handlers in turn as Express 5 does: each calls `next()` to go on or `next(err)` to fail; a
 * throw or a rejected promise fails too (a falsy throw goes on, as in Express). The route's own
 * handlers start at `route.start`, with its parameters (before them, `req.params` is empty, as
 * Express gives middleware). The last one answers, so none is left to call, and none skips to
 * another route (`next('route')`): the next route would be this one, in Express's router.
 */
function runHandlers(
  handlers: readonly RequestHandler[],
  route: { start: number; params: Record<string, string> },
  req: Request,
  res: Response,
  fail: (err: unknown) => void,
) {
  let at = 0;
  const next = (err?: unknown) => {
    if (err === 'route' || err === 'router')
      return fail(new Error(`${req.method} ${req.path}: next('${err}') is not supported on a table route`));
    if (err) return fail(err);
    if (at === route.start) req.params = route.params;
    const handler = handlers[at++];
    if (!handler) return fail(new Error(`${req.method} ${req.path}: the route's last handler called next()`));
    try {
      const result: unknown = handler(req, res, next);
      if (result instanceof Promise)
        result.catch((rejected: unknown) => fail(rejected || new Error('Rejected promise')));
    } catch (thrown) {
      next(thrown);
    }
  };
  next();
}

/** What the table does with one request: the route's handlers and its decoded path parameters. */
export interface Found {
  handlers: readonly RequestHandler[];
  params: Record<string, string>;
}

/**
 * The table's lookup. `paths` must be every path Express mounts, in the order it mounts them
 * (routeOrder): a path without handlers here still shadows the ones after it, as in Express.
 * Answers undefined where Express must decide (see the module's comment).
 */
export function compileRouteTable(
  paths: readonly TablePath[],
): (method: string, path: string) => Found | undefined {
  const bySegments = new Map<number, CompiledPath[]>();
  for (const path of paths) {
    const count = segmentCount(path.expressPath);
    bySegments.set(count, [...(bySegments.get(count) ?? []), compilePath(path)]);
  }
  return (method, path) => {
    for (const candidate of bySegments.get(segmentCount(path)) ?? []) {
      const match = candidate.pattern.exec(path);
      if (!match) continue;
      const handlers = candidate.handlers.get(method);
      const params = handlers && decodeParams(candidate.params, match);
      return handlers && params && { handlers, params };
    }
    return undefined;
  };
}

/**
 * Characters after which Node's URL parser, not a split at `?`, finds Express's path (parseurl's
 * fast path gives up on them); such requests, and any URL not starting with `/`, go to Express.
 */
const UNSIMPLE_URL = /[\t\n\f\r #\u00a0\ufeff]/;

/** The path of a request URL as Express reads it (`req.path`); undefined when Express must read it. */
function simplePath(url: string): string | undefined {
  if (url.charCodeAt(0) !== 0x2f || UNSIMPLE_URL.test(url)) return undefined;
  const query = url.indexOf('?');
  return query < 0 ? url : url.slice(0, query);
}

/**
 * Puts the table in front of an Express app. A request for one of its routes runs `before` (the
 * middleware the app runs for every request: request id, access log, CORS, body parsing) and then
 * the route's handlers, as Express would run them but without its router, which tries one layer at
 * a time; a failure goes to `onError`, the app's error handler for these paths. Every other request
 * is the app's, as before: Express's own routes still hold every operation.
 */
export function serveTableFirst(
  app: Express,
  paths: readonly TablePath[],
  before: readonly RequestHandler[],
  onError: ErrorRequestHandler,
): void {
  const find = compileRouteTable(
    paths.map(({ expressPath, handlers }) => ({
      expressPath,
      handlers: new Map([...handlers].map(([method, chain]) => [method, [...before, ...chain]])),
    })),
  );
  // Express's app is a function that passes each request to `app.handle` (express/lib/express.js),
  // a method its types leave out.
  const entry = app as unknown as { handle(req: Request, res: Response, callback?: NextFunction): void };
  const viaExpress = entry.handle.bind(app);
  entry.handle = (req, res, callback) => {
    const path = simplePath(req.url);
    const found = path === undefined ? undefined : find(req.method, path);
    if (!found) return viaExpress(req, res, callback);
    // What Express's app and router set up for every request that its handlers use
    // (express/lib/application.js handle); not `req.route`, `req.next`, nor the router's tracing.
    if (app.enabled('x-powered-by')) res.setHeader('X-Powered-By', 'Express');
    req.res = res;
    res.req = req;
    // Born with them on a server made with expressHttpClasses; else given them, as Express does.
    if (!Object.prototype.isPrototypeOf.call(app.request, req)) Object.setPrototypeOf(req, app.request);
    if (!Object.prototype.isPrototypeOf.call(app.response, res)) Object.setPrototypeOf(res, app.response);
    res.locals ??= Object.create(null);
    req.originalUrl ??= req.url;
    req.baseUrl = '';
    req.params = {};
    const route = { start: before.length, params: found.params };
    runHandlers(found.handlers, route, req, res, (err) => answerError(onError, err, req, res));
  };
}

/**
 * `onError` answers a failure. Should it fail too, the answer is a bare 500 (Express's last resort
 * would send an HTML page, with the stack outside production), or, once headers went out, the
 * connection is dropped.
 */
function answerError(onError: ErrorRequestHandler, err: unknown, req: Request, res: Response): void {
  const lastResort = () => {
    if (res.headersSent) res.destroy();
    else res.status(500).end();
  };
  try {
    const answered: unknown = onError(err, req, res, lastResort);
    if (answered instanceof Promise) answered.catch(lastResort);
  } catch {
    lastResort();
  }
}

/**
 * Node's request and response classes for a server of `app` (`http.createServer(classes, app)`):
 * each request and response is born with the app's prototypes (`app.request`, `app.response`) in
 * its chain, so the table need not change its prototype as Express does. An object whose prototype
 * changes once it is built takes a shape of its own, and the HTTP code that touches it afterwards
 * (node's, Express's) runs slower: on a bare node server on the bench machine, requests cost 68 µs
 * of CPU, 114 µs with Express's prototypes given as Express does, 82 µs with them from birth.
 */
export function expressHttpClasses(app: Express): {
  IncomingMessage: typeof IncomingMessage;
  ServerResponse: typeof ServerResponse;
} {
  class ExpressRequest extends IncomingMessage {}
  class ExpressResponse extends ServerResponse {}
  Object.setPrototypeOf(ExpressRequest.prototype, app.request);
  Object.setPrototypeOf(ExpressResponse.prototype, app.response);
  // (node's types declare ServerResponse's constructor generic over the request type)
  return { IncomingMessage: ExpressRequest, ServerResponse: ExpressResponse as typeof ServerResponse };
}
