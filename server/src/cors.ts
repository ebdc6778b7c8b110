/**
 * CORS for the origins the operator lists (`TUNERY_CORS_ORIGINS`), so a web page on one of them can
 * call the API with the SDK (`dangerouslyAllowBrowser`). Nothing is allowed by default: a page may
 * only read answers when its origin is listed. Preflights are answered here, before authentication
 * and the spec's validator, which knows no OPTIONS operations.
 */
import type { NextFunction, Request, Response } from 'express';

/** Request headers a page may send: the API's own and the SDK's. */
const ALLOWED_HEADERS = [
  'Authorization',
  'Content-Type',
  'Idempotency-Key',
  'Last-Event-ID',
  'Range',
  'X-Request-Id',
  'X-Tunery-Retry-Count',
].join(', ');

/** Response headers a page may read: request ids for support, and what retries and pages need. */
const EXPOSED_HEADERS = [
  'X-Request-Id',
  'Retry-After',
  'Retry-After-Ms',
  'X-Should-Retry',
  'Content-Range',
  'Content-Disposition',
].join(', ');

const PREFLIGHT_MAX_AGE_SECONDS = 600;

export function cors(allowedOrigins: readonly string[]) {
  const anyOrigin = allowedOrigins.includes('*');
  return (req: Request, res: Response, next: NextFunction) => {
    // The answer depends on the origin whenever origins are listed: caches must keep them apart.
    if (allowedOrigins.length > 0 && !anyOrigin) res.vary('Origin');
    const origin = req.headers.origin;
    if (!origin || !(anyOrigin || allowedOrigins.includes(origin))) return next();
    res.setHeader('Access-Control-Allow-Origin', anyOrigin ? '*' : origin);
    res.setHeader('Access-Control-Expose-Headers', EXPOSED_HEADERS);
    if (req.method !== 'OPTIONS' || !req.headers['access-control-request-method']) return next();
    res.setHeader('Access-Control-Allow-Methods', 'GET, POST, PUT, PATCH, DELETE');
    // A listed origin may send what it asks to (a client's own default headers, say); else the API's.
    res.setHeader(
      'Access-Control-Allow-Headers',
      req.headers['access-control-request-headers'] ?? ALLOWED_HEADERS,
    );
    res.setHeader('Access-Control-Max-Age', String(PREFLIGHT_MAX_AGE_SECONDS));
    res.status(204).end();
  };
}
