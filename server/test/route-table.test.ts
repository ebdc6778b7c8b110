/**
 * The route table, in front of an Express app, finds a request's route by Express's rules and runs
 * the middleware it is given and the route's handlers as Express would; anything it does not take
 * is the app's (here, a fallback that says so). That the real app answers alike either way is
 * checked on the spec's own paths in bound-validator.test.ts.
 */
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import express, { type NextFunction, type Request, type RequestHandler, type Response } from 'express';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compileRouteTable, serveTableFirst, type TablePath } from '../src/route-table.js';
import { operationsByPath } from '../src/spec.js';

const answer =
  (name: string): RequestHandler =>
  (req, res) => {
    res.json({ name, params: req.params });
  };
const proceed: RequestHandler = (_req, _res, next) => next();

let server: Server;
let base: string;

/** Marks the request, as the app's own middleware would: the table runs it first, as middleware. */
const before: RequestHandler = (req, res, next) => {
  res.setHeader('x-before', req.url);
  res.setHeader('x-before-params', JSON.stringify(req.params));
  next();
};

beforeAll(async () => {
  const app = express();
  app.use((req: Request, res: Response) => {
    res.json({ name: 'fallback', path: req.path });
  });
  const onError = (err: Error, _req: Request, res: Response, _next: NextFunction) => {
    if (err.message === 'unanswerable') throw new Error('the error handler fails too');
    res.status(500).json({ error: err.message });
  };
  serveTableFirst(
    app,
    [
      // Listed without handlers: it still shadows `/jobs/:id` for `/jobs/batch`, as in Express.
      { expressPath: '/jobs/batch', handlers: new Map() },
      { expressPath: '/jobs/:id', handlers: new Map([['GET', [proceed, answer('job')]]]) },
      { expressPath: '/jobs/:id/logs/:line', handlers: new Map([['get', [answer('line')]]]) },
      {
        expressPath: '/fail/:how',
        handlers: new Map<string, RequestHandler[]>([
          ['GET', [(_req, _res, next) => next(new Error('passed on'))]],
          [
            'POST',
            [
              () => {
                throw new Error('thrown');
              },
            ],
          ],
          ['PUT', [async () => Promise.reject(new Error('rejected'))]],
          ['PATCH', [proceed]],
          ['DELETE', [(_req, _res, next) => next('route')]],
        ]),
      },
      {
        expressPath: '/odd/:how',
        handlers: new Map<string, RequestHandler[]>([
          [
            'GET',
            [
              () => {
                throw new Error('unanswerable');
              },
            ],
          ],
          [
            'POST',
            [
              () => {
                throw undefined; // Express takes a falsy throw as next()
              },
              answer('after a falsy throw'),
            ],
          ],
        ]),
      },
    ],
    [before],
    onError,
  );
  server = app.listen(0, '127.0.0.1');
  await new Promise((resolve) => server.once('listening', resolve));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(() => new Promise((resolve) => server.close(resolve)));

const call = async (path: string, method = 'GET') => (await fetch(`${base}${path}`, { method })).json();

describe('serveTableFirst', () => {
  it("runs the middleware it is given before a route's handlers, and not for the app's requests", async () => {
    const ran = async (path: string) => (await fetch(`${base}${path}`)).headers.get('x-before');
    expect(await ran('/jobs/j?x=1')).toBe('/jobs/j?x=1');
    expect(await ran('/jobs/batch')).toBeNull();
  });

  it('gives the middleware no path parameters, as Express does, and the route its own', async () => {
    const res = await fetch(`${base}/jobs/j`);
    expect(res.headers.get('x-before-params')).toBe('{}');
    expect(await res.json()).toEqual({ name: 'job', params: { id: 'j' } });
  });

  it('answers a bare 500 when the error handler fails too, and goes on after a falsy throw', async () => {
    const res = await fetch(`${base}/odd/error`);
    expect(res.status).toBe(500);
    expect(await res.text()).toBe('');
    expect(await call('/odd/falsy', 'POST')).toEqual({
      name: 'after a falsy throw',
      params: { how: 'falsy' },
    });
  });

  it('runs the handlers of the route found, with its decoded path parameters', async () => {
    expect(await call('/jobs/job_1')).toEqual({ name: 'job', params: { id: 'job_1' } });
    expect(await call('/jobs/a%2Fb')).toEqual({ name: 'job', params: { id: 'a/b' } });
    expect(await call('/jobs/j/logs/7')).toEqual({ name: 'line', params: { id: 'j', line: '7' } });
  });

  it('matches as Express does: any case, one trailing slash, whole non-empty segments', async () => {
    expect(await call('/JOBS/j/')).toEqual({ name: 'job', params: { id: 'j' } });
    expect(await call('/jobs/j//')).toEqual({ name: 'fallback', path: '/jobs/j//' });
    expect(await call('/jobs//logs/7')).toEqual({ name: 'fallback', path: '/jobs//logs/7' });
    expect(await call('/jobs/j/logs')).toEqual({ name: 'fallback', path: '/jobs/j/logs' });
  });

  it('leaves to what follows a path listed earlier, another method, and a parameter that does not decode', async () => {
    expect(await call('/jobs/batch')).toEqual({ name: 'fallback', path: '/jobs/batch' });
    expect(await call('/jobs/j', 'DELETE')).toEqual({ name: 'fallback', path: '/jobs/j' });
    expect(await call('/jobs/%E0%A4%A')).toEqual({ name: 'fallback', path: '/jobs/%E0%A4%A' });
  });

  it("passes a handler's error on, whether given to next, thrown or a rejected promise", async () => {
    expect(await call('/fail/next')).toEqual({ error: 'passed on' });
    expect(await call('/fail/throw', 'POST')).toEqual({ error: 'thrown' });
    expect(await call('/fail/reject', 'PUT')).toEqual({ error: 'rejected' });
    expect(await call('/fail/last', 'PATCH')).toEqual({
      error: "PATCH /fail/last: the route's last handler called next()",
    });
    expect(await call('/fail/skip', 'DELETE')).toEqual({
      error: "DELETE /fail/skip: next('route') is not supported on a table route",
    });
  });

  it('refuses a path whose segments it cannot match as Express would', () => {
    for (const expressPath of ['/files/{name}', '/files/:name.json', '/v1/*rest'])
      expect(() => compileRouteTable([{ expressPath, handlers: new Map() }])).toThrow(/cannot match/);
  });
});

/**
 * Every spec path, mounted as app.ts mounts it (an Express route per path, in routeOrder, `all` for
 * other methods) and in a table holding every operation: for each request, the table must answer
 * exactly as Express's router does, or leave it to Express.
 */
describe('the route table on the spec’s paths', () => {
  const paths = operationsByPath();
  const answerAs =
    (operation: string): RequestHandler =>
    (req, res) => {
      res.json({ operation, params: req.params });
    };
  const expressApp = express();
  const router = express.Router();
  for (const [expressPath, operations] of paths) {
    const route = router.route(expressPath);
    for (const op of operations) route[op.method](answerAs(op.operationId));
    route.all(answerAs('method not allowed'));
  }
  expressApp.use(router);
  const tableApp = express();
  tableApp.use((_req: Request, res: Response) => {
    res.json({ left: true });
  });
  const table: TablePath[] = paths.map(([expressPath, operations]) => ({
    expressPath,
    handlers: new Map(operations.map((op) => [op.method, [answerAs(op.operationId)]])),
  }));
  serveTableFirst(tableApp, table, [], (err: Error, _req: Request, res: Response) => {
    res.status(500).json({ error: err.message });
  });
  const servers: Server[] = [];
  const urls: string[] = [];

  beforeAll(async () => {
    for (const app of [expressApp, tableApp]) {
      const server = app.listen(0, '127.0.0.1');
      await new Promise((resolve) => server.once('listening', resolve));
      servers.push(server);
      urls.push(`http://127.0.0.1:${(server.address() as AddressInfo).port}`);
    }
  });
  afterAll(() => Promise.all(servers.map((server) => new Promise((resolve) => server.close(resolve)))));

  /** Each spec path with its parameters filled in, in the forms a client might send it. */
  const requests = paths.flatMap(([expressPath]) => {
    const filled = expressPath.replace(/:\w+/g, 'x_1');
    return [
      filled,
      `${filled}?x=1`,
      `${filled}/`,
      filled.toUpperCase(),
      expressPath.replace(/:\w+/g, 'a%2Fb'),
      expressPath.replace(/:\w+/g, 'complete'),
      expressPath.replace(/:\w+/g, 'build'),
      expressPath.replace(/:\w+/g, '%E0%A4%A'),
      `${filled}//`,
      filled.replace('/v1/', '/v1//'),
    ];
  });

  it('answers as Express would, or leaves the request to it', async () => {
    let answered = 0;
    for (const path of requests) {
      for (const method of ['GET', 'POST', 'PUT', 'DELETE']) {
        const [byExpress, byTable] = await Promise.all(
          urls.map(async (url) => {
            const res = await fetch(`${url}${path}`, { method });
            return { status: res.status, body: await res.text() };
          }),
        );
        if (byTable!.body === '{"left":true}') continue;
        answered++;
        expect({ method, path, ...byTable }).toEqual({ method, path, ...byExpress });
      }
    }
    // It answers most of them: every path in its usual forms, with the methods it has.
    expect(answered).toBeGreaterThan(paths.length * 4);
  });
});
