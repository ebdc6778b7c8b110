/**
 * The route table finds a request's route by Express's rules and runs its handlers as Express
 * would; anything it does not take goes on (here, to a fallback that says so). That it agrees with
 * the real app's Express routes is checked on the spec's own paths in bound-validator.test.ts.
 */
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import express, { type NextFunction, type Request, type RequestHandler, type Response } from 'express';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { routeTable } from '../src/route-table.js';

const answer =
  (name: string): RequestHandler =>
  (req, res) => {
    res.json({ name, params: req.params });
  };
const proceed: RequestHandler = (_req, _res, next) => next();

let server: Server;
let base: string;

beforeAll(async () => {
  const app = express();
  app.use(
    routeTable([
      // Listed without handlers: it still shadows `/jobs/:id` for `/jobs/batch`, as in Express.
      { expressPath: '/jobs/batch', handlers: new Map() },
      { expressPath: '/jobs/:id', handlers: new Map([['GET', [proceed, answer('job')]]]) },
      { expressPath: '/jobs/:id/logs/:line', handlers: new Map([['GET', [answer('line')]]]) },
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
        ]),
      },
    ]),
  );
  app.use((req: Request, res: Response) => {
    res.json({ name: 'fallback', path: req.path });
  });
  app.use((err: Error, _req: Request, res: Response, _next: NextFunction) => {
    res.status(500).json({ error: err.message });
  });
  server = app.listen(0, '127.0.0.1');
  await new Promise((resolve) => server.once('listening', resolve));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(() => new Promise((resolve) => server.close(resolve)));

const call = async (path: string, method = 'GET') => (await fetch(`${base}${path}`, { method })).json();

describe('routeTable', () => {
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
  });
});
