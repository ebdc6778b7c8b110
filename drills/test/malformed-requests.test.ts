/**
 * Drill (d): 1,000 malformed requests across every operation of the spec (seeded, so a failure
 * replays): bad JSON and random bytes, wrong types, path and query parameters outside their schemas,
 * huge values, bodies past TUNERY_MAX_JSON_BYTES or nested past 64 levels, strings with lone UTF-16
 * surrogates, methods a path does not have (405 with `Allow`), bad credentials,
 * content types an operation does not take, header parameters past their limits. Every answer must
 * be a 4xx in the spec's `{"error": {code, message, param}}` shape (never a 5xx, never HTML), and
 * the server must still answer `/v1/health` afterwards.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DrillServer,
  isErrorShape,
  killAll,
  printChildrenOnFailure,
  prng,
  type Schemas,
} from '../src/harness.js';
import { loadOperations, type MalformedRequest, RequestFactory } from '../src/malformed.js';

const REQUESTS = 1000;
const CONCURRENCY = 4;
const SEED = 0xbad_5eed;
const MAX_JSON_BYTES = 65_536;

let server: DrillServer;

beforeAll(async () => {
  server = await DrillServer.start({
    name: 'malformed',
    env: { TUNERY_MAX_JSON_BYTES: String(MAX_JSON_BYTES) },
  });
});

afterAll(killAll);

interface Outcome {
  request: MalformedRequest;
  status: number;
  contentType: string;
  /** The `Allow` header (RFC 9110: every 405 lists the methods the path has). */
  allow: string | null;
  text: string;
  error?: string;
}

async function send(request: MalformedRequest): Promise<Outcome> {
  try {
    const res = await fetch(`${server.url}${request.path}`, {
      method: request.method,
      headers: request.headers,
      body: request.body,
      signal: AbortSignal.timeout(30_000),
    });
    return {
      request,
      status: res.status,
      contentType: res.headers.get('content-type') ?? '',
      allow: res.headers.get('allow'),
      text: await res.text(),
    };
  } catch (err) {
    return {
      request,
      status: 0,
      contentType: '',
      allow: null,
      text: '',
      error: String((err as Error).cause ?? err),
    };
  }
}

/** Why an answer breaks the rules, or undefined when it is a proper 4xx error. */
function violation(outcome: Outcome): string | undefined {
  if (outcome.error) return `no answer: ${outcome.error}`;
  if (outcome.status < 400 || outcome.status > 499) return `status ${outcome.status}`;
  if (/<html|<!doctype/i.test(outcome.text)) return 'an HTML body';
  if (!outcome.contentType.startsWith('application/json')) return `content-type "${outcome.contentType}"`;
  if (outcome.status === 405 && !outcome.allow) return 'a 405 without an Allow header';
  let body: unknown;
  try {
    body = JSON.parse(outcome.text);
  } catch {
    return 'a body that is not JSON';
  }
  return isErrorShape(body) ? undefined : 'a body that is not {"error": {code, message, param}}';
}

function describeRequest({ n, defect, operationId, method, path, headers, body }: MalformedRequest): string {
  const shown = typeof body === 'string' ? body : body ? `<${body.length} bytes>` : '';
  return `#${n} ${operationId} [${defect}] ${method} ${path.slice(0, 200)} headers=${JSON.stringify(
    Object.fromEntries(
      Object.entries(headers).map(([k, v]) => [k, v.length > 80 ? `${v.slice(0, 80)}…` : v]),
    ),
  )} body=${shown.slice(0, 200)}`;
}

describe('drill: malformed requests', () => {
  it(`answers ${REQUESTS} malformed requests across every operation with 4xx errors in the error shape`, async () => {
    printChildrenOnFailure();
    // Real objects, so that some defects land on paths that exist.
    const dataset = await server.ok<Schemas['Dataset']>('POST', '/v1/datasets', {
      name: 'drill',
      train_texts: ['a real dataset'],
    });
    const job = await server.ok<Schemas['TrainingJob']>('POST', '/v1/training/jobs', {
      base_model: 'drill/unknown-model',
      dataset_id: dataset.id,
      training_config: { max_steps: 1 },
    });
    const operations = loadOperations();
    expect(operations.length).toBeGreaterThan(50);
    const factory = new RequestFactory(prng(SEED), {
      userKey: server.adminKey,
      workerToken: server.workerToken,
      ids: { job_id: [job.id], dataset_id: [dataset.id], template_name: ['lora-default'] },
      maxJsonBytes: MAX_JSON_BYTES,
    });
    const requests = Array.from({ length: REQUESTS }, (_, i) =>
      factory.make(operations[i % operations.length]!),
    );

    const outcomes: Outcome[] = [];
    let next = 0;
    await Promise.all(
      Array.from({ length: CONCURRENCY }, async () => {
        while (next < requests.length) outcomes.push(await send(requests[next++]!));
      }),
    );

    const byStatus = new Map<number, number>();
    const byDefect = new Map<string, number>();
    for (const o of outcomes) {
      byStatus.set(o.status, (byStatus.get(o.status) ?? 0) + 1);
      byDefect.set(o.request.defect, (byDefect.get(o.request.defect) ?? 0) + 1);
    }
    console.info(
      `statuses: ${JSON.stringify(Object.fromEntries([...byStatus].sort()))}\n` +
        `defects: ${JSON.stringify(Object.fromEntries(byDefect), null, 1)}\n` +
        `operations covered: ${new Set(outcomes.map((o) => o.request.operationId)).size}/${operations.length}`,
    );
    const bad = outcomes
      .map((o) => ({ o, why: violation(o) }))
      .filter((x) => x.why)
      .sort((a, b) => a.o.request.n - b.o.request.n);
    const report = bad
      .slice(0, 25)
      .map(
        ({ o, why }) => `${why} (${o.status} ${o.text.slice(0, 200)})\n    ← ${describeRequest(o.request)}`,
      )
      .join('\n');
    expect(bad.length, `${bad.length} of ${REQUESTS} answers broke the rules:\n${report}`).toBe(0);
    expect(new Set(outcomes.map((o) => o.request.operationId)).size).toBe(operations.length);

    // Still healthy, and still doing real work.
    expect((await server.request('GET', '/v1/health')).status).toBe(200);
    const again = await server.request<Schemas['TrainingJob']>('GET', `/v1/training/jobs/${job.id}`);
    expect(again.status).toBe(200);
    expect(again.body.status).toBe('pending');
    expect(server.child.alive).toBe(true);
  });
});
