import { randomUUID } from 'node:crypto';
import express, { type NextFunction, type Request, type RequestHandler, type Response } from 'express';
import * as OpenApiValidator from 'express-openapi-validator';
import { pinoHttp } from 'pino-http';
import {
  authenticateRequest,
  authFailureOf,
  isSecurityScheme,
  missingKey,
  SCHEME_PRINCIPALS,
} from './auth.js';
import { BOUND_OPERATIONS, boundValidator } from './bound-validator.js';
import type { AppContext } from './context.js';
import { cors } from './cors.js';
import { STORABLE_DATE_TIME } from './date-time.js';
import { ApiError, type ValidatorError } from './errors.js';
import { type Handler, wrap } from './http.js';
import { jsonBody } from './json-body.js';
import { metricsRoute, timeOperation } from './metrics.js';
import { serveTableFirst, type TablePath } from './route-table.js';
import { allRoutes } from './routes/index.js';
import { OPENAI_PREFIX, openAIErrorBody } from './routes/openai/errors.js';
import { datasetUploadOptions, discardUnclaimedUploads } from './services/dataset-upload.js';
import { operationsByPath, specOperations, specPath } from './spec.js';

/**
 * Builds the Express app: request ids and logs, body parsing, spec validation, routes, errors.
 * `boundOperations` are validated by bound-validator.ts, the rest by express-openapi-validator (a
 * test passes none, to compare the two on the same requests).
 */
export function createApp(
  ctx: AppContext,
  { boundOperations = BOUND_OPERATIONS }: { boundOperations?: ReadonlySet<string> } = {},
): express.Express {
  const app = express();
  app.disable('x-powered-by');
  // JSON answers carry no ETag: no client revalidates them, and each would cost a hash of the body.
  // File downloads set their own (the file's SHA-256), as the spec says.
  app.set('etag', false);
  app.set('query parser', 'extended');

  // What every request goes through first, here and on the route table's shortcut (route-table.ts).
  const everyRequest = [requestId, ...accessLog(ctx), cors(ctx.config.corsOrigins)];
  const body = jsonBody(ctx.config.maxJsonBytes);
  app.use(everyRequest);
  // Operators' metrics and the generated docs (pnpm run docs) are outside the API and its validator.
  app.get('/metrics', metricsRoute(ctx));
  app.use('/docs', express.static(ctx.config.docsDir, { index: 'index.html', fallthrough: true }));
  app.use(body);
  const table = mountRoutes(
    app,
    ctx,
    boundOperations,
    OpenApiValidator.middleware({
      apiSpec: specPath,
      // Path, query and header values are text and are always coerced to their schema's type; a
      // JSON body is taken as sent (`null` is not 0, `"5"` is not 5), or a wrong type would be stored.
      validateRequests: { allowUnknownQueryParameters: false, coerceTypes: false },
      validateResponses: { removeAdditional: false },
      validateFormats: true,
      formats: { 'date-time': STORABLE_DATE_TIME },
      // Multipart files stream to disk after authentication (services/dataset-upload.ts).
      fileUploader: datasetUploadOptions(ctx),
      validateSecurity: {
        handlers: Object.fromEntries(
          Object.keys(SCHEME_PRINCIPALS)
            .filter(isSecurityScheme)
            .map((scheme) => [scheme, (req: Request) => authenticateRequest(ctx.knex, req, scheme)]),
        ),
      },
    }),
  );

  app.use((req: Request) => {
    throw new ApiError(404, 'not_found', `No route ${req.method} ${req.path}.`);
  });
  // The OpenAI-compatible routes answer errors in OpenAI's shape, so its clients' typed errors fire.
  app.use(OPENAI_PREFIX, errorHandler(ctx, openAIErrorBody));
  const tuneryErrors = errorHandler(ctx);
  app.use(tuneryErrors);
  serveTableFirst(app, table, [...everyRequest, ...body], tuneryErrors);
  return app;
}

/**
 * Access logs: one line per request (request id, status, time). When the level leaves them out,
 * pino-http is not mounted at all, so a quiet server pays nothing for them.
 */
function accessLog(ctx: AppContext): RequestHandler[] {
  if (!ctx.logger.isLevelEnabled('warn')) return [];
  return [
    pinoHttp({
      logger: ctx.logger,
      genReqId: (req) => req.id as string,
      customLogLevel: (_req, res, err) =>
        err || res.statusCode >= 500 ? 'error' : res.statusCode >= 400 ? 'warn' : 'info',
      autoLogging: { ignore: (req) => req.url === '/v1/health' },
    }),
  ];
}

/** The caller's `x-request-id`, or a new one, on the request (`req.id`) and its answer. */
function requestId(req: Request, res: Response, next: NextFunction): void {
  const id = (req.headers['x-request-id'] as string | undefined) ?? `req_${randomUUID().replaceAll('-', '')}`;
  req.id = id;
  res.setHeader('x-request-id', id);
  next();
}

/** Operations of the spec that no route module handles (a test keeps this empty). */
export function unhandledOperations(): string[] {
  const handlers = allRoutes as Record<string, Handler>;
  return specOperations()
    .filter((op) => !handlers[op.operationId])
    .map((op) => op.operationId);
}

/**
 * Mounts each spec path once, with one handler per operation behind the spec's validator (the hot
 * operations behind their own, compiled now: bound-validator.ts). The validator runs inside the
 * route Express matched and takes the operation from it (`req.route`, see
 * patches/express-openapi-validator@5.6.2.patch): no request's path is matched against the whole
 * spec. Any other method on the path reaches the validator through `all`, which answers 405 with
 * `Allow`; so does HEAD, which the spec does not have (Express would run a GET's handler for it).
 * Paths go in routeOrder, so `/v1/datasets/build` is never taken for a dataset id.
 *
 * Answers the route table (route-table.ts): every path in the same order, with the bound operations'
 * handler chains, which the table runs without walking Express's router (the same chain objects as
 * Express's routes hold). Bound operations stay under /v1/: the table's requests skip `/metrics` and
 * `/docs`, and its failures get Tunery's error shape, not the OpenAI surface's (`/openai/v1`).
 */
function mountRoutes(
  app: express.Express,
  ctx: AppContext,
  boundOperations: ReadonlySet<string>,
  validator: RequestHandler[],
): TablePath[] {
  const handlers = allRoutes as Record<string, Handler>;
  const table: TablePath[] = [];
  const routes = express.Router();
  for (const [expressPath, operations] of operationsByPath()) {
    const route = routes.route(expressPath).head(validator);
    const tableHandlers = new Map<string, RequestHandler[]>();
    for (const op of operations) {
      const handler = handlers[op.operationId];
      if (!handler) continue;
      const bound = boundOperations.has(op.operationId);
      const chain = [
        bound ? boundValidator(ctx, op) : validator,
        timeOperation(ctx.metrics, op.operationId),
        wrap(handler, ctx),
      ].flat();
      route[op.method](chain);
      if (bound && !expressPath.startsWith('/v1/'))
        throw new Error(`${op.operationId}: a bound operation must be under /v1/ (see mountRoutes)`);
      if (bound) tableHandlers.set(op.method, chain);
    }
    route.all(validator);
    table.push({ expressPath, handlers: tableHandlers });
  }
  app.use(routes);
  return table;
}

/**
 * Postgres data exceptions caused by a value the client sent, which the spec's schemas allow: a NUL
 * (`\u0000`) in JSON or text (22P05, 22021), an integer past the column's range (22003, or 22P02
 * once JavaScript writes it as `1e+22`), a timestamp Postgres cannot hold (22008, 22009: February
 * 30, an offset beyond ±15:59; the `date-time` format, date-time.ts, refuses those first, with the
 * field's name, so these two are a backstop).
 */
const CLIENT_DATA_SQLSTATES: Record<string, string> = {
  '22P05': 'Text may not contain the NUL character (\\u0000).',
  '22021': 'Text may not contain the NUL character (\\u0000).',
  '22003': 'A number in the request is out of range.',
  '22P02': 'A number in the request is out of range.',
  '22008': 'A timestamp in the request is out of range.',
  '22009': 'A timestamp in the request has an out-of-range UTC offset.',
};

/** `/body/training_config/batch_size` → `training_config.batch_size`; `/query/limit` → `limit`. */
function paramFromPath(path: string | undefined): string | null {
  if (!path) return null;
  const parts = path
    .replace(/^\.?\/?/, '')
    .split(/[/.]/)
    .filter(Boolean);
  if (['body', 'query', 'params', 'headers', 'path'].includes(parts[0] ?? '')) parts.shift();
  return parts.length ? parts.join('.') : null;
}

/**
 * The code of a request the spec's schema refuses. Seed 000 names every bad distillation create
 * `invalid_config` ("unknown model, missing required field, or bad range"); elsewhere `invalid_request`.
 */
const schemaErrorCode = (req: Request, status: number) =>
  status === 400 && req.method === 'POST' && req.path.replace(/\/$/, '') === '/v1/distillation'
    ? 'invalid_config'
    : 'invalid_request';

/** Maps every failure to the spec's error shape. Never HTML, never a stack trace. */
function toApiError(err: unknown, req: Request): ApiError {
  if (err instanceof ApiError) return err;
  const e = err as ValidatorError;
  const dataError = e.code ? CLIENT_DATA_SQLSTATES[e.code] : undefined;
  if (dataError) return new ApiError(400, 'invalid_request', dataError);
  // multer/busboy refuse a malformed multipart body before any route runs; the validator calls that a 500.
  if (e.status === 500 && req.is('multipart/form-data') && !e.message?.startsWith('/response'))
    return new ApiError(400, 'invalid_request', `Malformed multipart body: ${e.message ?? 'unreadable'}.`);
  const status = e.status ?? e.statusCode ?? 500;
  if (e.type === 'entity.too.large' || status === 413) {
    return new ApiError(413, 'payload_too_large', 'Request body is too large.');
  }
  if (e.type === 'entity.parse.failed')
    return new ApiError(400, 'invalid_request', 'Malformed JSON in request body.');
  // Why authentication failed; anything but a refusal (the database failed) is a 500. Without the
  // header the validator refuses before calling a security handler.
  if (status === 401) {
    const failure = authFailureOf(req);
    if (failure === undefined) return missingKey();
    return failure instanceof ApiError
      ? failure
      : new ApiError(500, 'internal_error', 'Internal server error.');
  }
  if (status === 404) return new ApiError(404, 'not_found', 'No such route.');
  // RFC 9110: a 405 lists the methods the path has (the validator computes them from the spec).
  if (status === 405)
    return new ApiError(405, 'method_not_allowed', e.message ?? 'Method not allowed.', null, {
      ...(e.headers?.Allow ? { Allow: e.headers.Allow } : {}),
    });
  // The spec documents 400 (not 415) for a body that is missing or of a type the operation does not take.
  if (status === 415)
    return new ApiError(400, 'invalid_request', 'Missing or unsupported Content-Type for this operation.');
  if (status >= 400 && status < 500) {
    const first = e.errors?.[0];
    const param = paramFromPath(first?.path);
    const detail = first ? `${param ?? 'request'}: ${first.message}` : (e.message ?? 'Invalid request.');
    return new ApiError(status, schemaErrorCode(req, status), detail, param);
  }
  return new ApiError(500, 'internal_error', 'Internal server error.');
}

/** Tunery's error body, the spec's `{"error": {"code", "message", "param"}}`. */
const tuneryErrorBody = (e: ApiError): string =>
  JSON.stringify({ error: { code: e.code, message: e.message, param: e.param } });

function errorHandler(ctx: AppContext, body: (e: ApiError) => string = tuneryErrorBody) {
  return async (err: unknown, req: Request, res: Response, _next: NextFunction) => {
    const apiError = toApiError(err, req);
    // A 500 from authentication logs its cause (the validator passes on only a bare 401).
    if (apiError.status >= 500)
      ctx.logger.error({ err: authFailureOf(req) ?? err, reqId: req.id }, 'request failed');
    if (res.headersSent) {
      res.destroy();
      return;
    }
    await discardUnclaimedUploads(req).catch((cause: unknown) =>
      ctx.logger.warn({ err: cause, reqId: req.id }, 'could not remove a refused upload'),
    );
    for (const [name, value] of Object.entries(apiError.headers)) res.setHeader(name, value);
    // A refused request whose body is still arriving (an unauthenticated upload of many GB, say) is
    // not drained: the answer closes the connection, so the sender cannot hold the socket open.
    if (!req.complete) {
      res.setHeader('Connection', 'close');
      res.once('finish', () => req.socket.destroy());
    }
    // Written directly: the error shape is the spec's, and the validator must not re-check it.
    res.status(apiError.status).type('application/json').send(body(apiError));
  };
}
