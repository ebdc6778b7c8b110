/**
 * Drill (e): a flood of deeply nested JSON bodies — 20 KB of `[[[[…`, 200 KB of `{"a":{"a":…`, and
 * 2 MB bodies whose nesting starts after a long string — sent concurrently to user, worker and
 * unknown routes, with and without credentials. Every one must be refused with `400
 * invalid_request` in the error shape (never a 5xx: the server used to recurse on them), while
 * `/v1/health`, polled one request after another throughout, keeps answering 200 within a bound
 * generous enough for a loaded two-core machine (each refusal is one O(n) scan of the raw body).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DrillServer, isErrorShape, killAll, printChildrenOnFailure } from '../src/harness.js';

const REQUESTS = 240;
const CONCURRENCY = 16;
/** Health requests sent, one after another, while the flood runs. */
const HEALTH_CHECKS = 20;
/** Every health answer must come within this, flood or not. */
const HEALTH_BOUND_MS = 2000;

let server: DrillServer;

beforeAll(async () => {
  server = await DrillServer.start({ name: 'deep-json' });
});

afterAll(killAll);

/** The bodies of the flood, in turn: each nests far past the server's 64 levels. */
const BODIES = [
  `${'['.repeat(10_000)}${']'.repeat(10_000)}`,
  `${'{"a":'.repeat(40_000)}{}${'}'.repeat(40_000)}`,
  `{"train_texts":["${'x'.repeat(2_000_000)}"],"metadata":${'['.repeat(5_000)}${']'.repeat(5_000)}}`,
];

interface Answer {
  status: number;
  text: string;
  ms: number;
}

async function post(path: string, body: string, key: string | null): Promise<Answer> {
  const started = performance.now();
  const res = await fetch(`${server.url}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(key ? { authorization: `Bearer ${key}` } : {}) },
    body,
    signal: AbortSignal.timeout(60_000),
  });
  return { status: res.status, text: await res.text(), ms: performance.now() - started };
}

describe('drill: deep-JSON flood', () => {
  it(`refuses ${REQUESTS} deeply nested bodies with 400 while /v1/health stays fast`, async () => {
    printChildrenOnFailure();
    const targets: { path: string; key: string | null }[] = [
      { path: '/v1/training/jobs', key: null },
      { path: '/v1/training/jobs', key: server.adminKey },
      { path: '/v1/datasets', key: 'tk_not_a_real_key' },
      { path: '/v1/workers/claim', key: server.workerToken },
      { path: '/v1/no-such-route', key: null },
    ];

    let flooding = true;
    const health: Answer[] = [];
    const healthLoop = (async () => {
      while (flooding) {
        const started = performance.now();
        const res = await fetch(`${server.url}/v1/health`, { signal: AbortSignal.timeout(30_000) });
        health.push({ status: res.status, text: await res.text(), ms: performance.now() - started });
      }
    })();

    const answers: (Answer & { n: number })[] = [];
    let next = 0;
    // The flood goes on until it has sent REQUESTS and health has been asked HEALTH_CHECKS times:
    // every health check overlaps the flood by construction, however fast either side runs.
    await Promise.all(
      Array.from({ length: CONCURRENCY }, async () => {
        while (next < REQUESTS || health.length < HEALTH_CHECKS) {
          const n = next++;
          const target = targets[n % targets.length]!;
          answers.push({ n, ...(await post(target.path, BODIES[n % BODIES.length]!, target.key)) });
        }
      }),
    );
    flooding = false;
    await healthLoop;

    const slowest = (list: Answer[]) => Math.round(Math.max(...list.map((a) => a.ms)));
    console.info(
      `flood: ${answers.length} answers, slowest ${slowest(answers)} ms; ` +
        `health: ${health.length} answers, slowest ${slowest(health)} ms`,
    );
    const wrong = answers.filter((a) => {
      if (a.status !== 400) return true;
      const body = JSON.parse(a.text) as unknown;
      return (
        !isErrorShape(body) ||
        body.error.code !== 'invalid_request' ||
        !/deeper than 64/.test(body.error.message)
      );
    });
    expect(wrong.slice(0, 5), `${wrong.length} answers were not 400 invalid_request`).toEqual([]);
    expect(answers.length).toBeGreaterThanOrEqual(REQUESTS);

    // Health answered throughout the flood …
    expect(health.length).toBeGreaterThanOrEqual(HEALTH_CHECKS);
    expect(health.filter((h) => h.status !== 200)).toEqual([]);
    // … and never slowly.
    expect(health.filter((h) => h.ms > HEALTH_BOUND_MS)).toEqual([]);
    expect(server.child.alive).toBe(true);
  });
});
