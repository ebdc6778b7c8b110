import { getEventListeners } from 'node:events';
import { readFileSync } from 'node:fs';
import { delay, HttpResponse, http } from 'msw';
import { afterEach, describe, expect, it, vi } from 'vitest';
import {
  APIConnectionError,
  APIConnectionTimeoutError,
  APIUserAbortError,
  ConflictError,
  InsufficientCreditsError,
  InternalServerError,
  type Middleware,
  RateLimitError,
  Tunery,
  TuneryError,
  UnparsableResponseError,
} from '../../src/index.js';
import { BASE_URL, memoryLogger, useMockServer } from '../helpers.js';

const { mock, server, client } = useMockServer();

const finetune = { base_model: 'tiny-llama', train_texts: ['hello'] };
const idempotencyKeys = (operationId: string) =>
  mock.state.requests.filter((r) => r.operationId === operationId).map((r) => r.headers['idempotency-key']);

afterEach(() => {
  vi.unstubAllEnvs();
});

describe('retries', () => {
  it('waits out a 429 with Retry-After: 1, then retries once with the same Idempotency-Key', async () => {
    mock.failNext('createTrainingJob', 429, { headers: { 'Retry-After': '1' } });
    const started = performance.now();
    const job = await client().training.jobs.create(finetune);
    const elapsed = performance.now() - started;

    expect(job.status).toBe('pending');
    const keys = idempotencyKeys('createTrainingJob');
    expect(keys).toHaveLength(2);
    expect(keys[0]).toMatch(/^[0-9a-f-]{36}$/);
    expect(keys[1]).toBe(keys[0]);
    expect(elapsed).toBeGreaterThanOrEqual(1000);
    expect(mock.state.trainingJobs.size).toBe(1);
  });

  it('retries 5xx and connection errors up to maxRetries, then throws', async () => {
    mock.failNext('getBudget', 500, { headers: { 'retry-after-ms': '0' } });
    mock.failNext('getBudget', 'network');
    await expect(client().budget.get()).resolves.toMatchObject({ tenant_id: 'default' });

    mock.failNext('getBudget', 503, { headers: { 'retry-after-ms': '0' }, times: 3 });
    const error = await client()
      .budget.get()
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(InternalServerError);
    expect(mock.state.requests.filter((r) => r.operationId === 'getBudget')).toHaveLength(3 + 3);
  });

  it('throws APIConnectionError when the network keeps failing', async () => {
    mock.failNext('getBudget', 'network', { times: 3 });
    const tunery = client({ maxRetries: 2 });
    vi.spyOn(Math, 'random').mockReturnValue(1); // shortest backoff: 0.5 s · 0.75, then 1 s · 0.75
    await expect(tunery.budget.get()).rejects.toBeInstanceOf(APIConnectionError);
    vi.restoreAllMocks();
  });

  it('takes maxRetries from the client and from the call', async () => {
    mock.failNext('getBudget', 500, { headers: { 'retry-after-ms': '0' }, times: 10 });
    await expect(client({ maxRetries: 0 }).budget.get()).rejects.toBeInstanceOf(InternalServerError);
    expect(mock.state.requests).toHaveLength(1);
    await expect(client({ maxRetries: 0 }).budget.get({ maxRetries: 4 })).rejects.toBeInstanceOf(
      InternalServerError,
    );
    expect(mock.state.requests).toHaveLength(1 + 5);
  });

  it('retries a lock-style 409 but not idempotency_conflict or job_already_running', async () => {
    mock.failNext('createTrainingJob', 409, {
      code: 'request_in_progress',
      headers: { 'retry-after-ms': '0' },
    });
    await expect(client().training.jobs.create(finetune)).resolves.toMatchObject({ status: 'pending' });
    expect(idempotencyKeys('createTrainingJob')).toHaveLength(2);

    for (const code of ['idempotency_conflict', 'job_already_running']) {
      mock.state.requests.length = 0;
      mock.failNext('createTrainingJob', 409, { code, headers: { 'retry-after-ms': '0' } });
      const error = await client()
        .training.jobs.create(finetune)
        .catch((e: unknown) => e);
      expect(error).toBeInstanceOf(ConflictError);
      expect((error as ConflictError).code).toBe(code);
      expect(mock.state.requests).toHaveLength(1);
    }
  });

  it('does not retry other 4xx', async () => {
    mock.state.budget.limit_usd = 0;
    const error = await client()
      .training.jobs.create(finetune)
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(InsufficientCreditsError);
    expect(mock.state.requests).toHaveLength(1);
  });

  it('gives up on RateLimitError after the last retry', async () => {
    mock.failNext('getTrainingStats', 429, { headers: { 'retry-after-ms': '1' }, times: 3 });
    const error = await client()
      .training.stats()
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(RateLimitError);
    expect((error as RateLimitError).code).toBe('rate_limited');
  });

  it('rebuilds a multipart body for every attempt', async () => {
    mock.failNext('createDataset', 500, { headers: { 'retry-after-ms': '0' } });
    const dataset = await client().datasets.upload({
      file: new Blob(['{"text": "one"}\n{"text": "two"}\n']),
      filename: 'two.jsonl',
      name: 'two',
    });
    expect(dataset).toMatchObject({ name: 'two', num_examples: 2, source: 'upload' });
  });
});

describe('402', () => {
  it('is an InsufficientCreditsError with its code and message', async () => {
    mock.state.budget.limit_usd = 0.01;
    const error = await client()
      .training.jobs.create(finetune)
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(InsufficientCreditsError);
    expect(error).toMatchObject({ status: 402, code: 'insufficient_credits', param: null });
    expect((error as Error).message).toMatch(/^402 insufficient_credits: Estimated cost \$0\.06 exceeds/);
  });
});

describe('idempotency keys', () => {
  it('sends a fresh key on each creating POST and none elsewhere', async () => {
    const tunery = client();
    const job = await tunery.training.jobs.create(finetune);
    await tunery.training.jobs.create(finetune);
    await tunery.training.jobs.cancel(job.id);
    await tunery.training.estimate({ base_model: 'tiny-llama' });
    const [first, second] = idempotencyKeys('createTrainingJob');
    expect(first).not.toBe(second);
    expect(idempotencyKeys('cancelTrainingJob')).toEqual([undefined]);
    expect(idempotencyKeys('estimateTraining')).toEqual([undefined]);
  });

  it('uses the caller’s key, and a repeat returns the same job', async () => {
    const tunery = client();
    const a = await tunery.training.jobs.create(finetune, { idempotencyKey: 'nightly-2026-04-19' });
    const b = await tunery.training.jobs.create(finetune, { idempotencyKey: 'nightly-2026-04-19' });
    expect(b.id).toBe(a.id);
    expect(idempotencyKeys('createTrainingJob')).toEqual(['nightly-2026-04-19', 'nightly-2026-04-19']);
    const conflict = await tunery.training.jobs
      .create({ ...finetune, run_name: 'other' }, { idempotencyKey: 'nightly-2026-04-19' })
      .catch((e: unknown) => e);
    expect(conflict).toMatchObject({ status: 409, code: 'idempotency_conflict' });
  });
});

describe('timeouts and aborts', () => {
  const slowBudget = (ms: number) =>
    server.use(
      http.get(`${BASE_URL}/v1/budget`, async () => {
        await delay(ms);
        return HttpResponse.json({
          tenant_id: 'default',
          limit_usd: null,
          spent_usd: 0,
          remaining_usd: null,
        });
      }),
    );

  it('turns a request that outlives `timeout` into APIConnectionTimeoutError', async () => {
    slowBudget(2_000);
    const started = performance.now();
    const error = await client({ timeout: 50, maxRetries: 0 })
      .budget.get()
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(APIConnectionTimeoutError);
    expect(performance.now() - started).toBeLessThan(1_500);
  });

  it('retries a timed-out attempt, with the per-call timeout', async () => {
    let calls = 0;
    server.use(
      http.get(`${BASE_URL}/v1/budget`, async () => {
        calls++;
        if (calls === 1) await delay(2_000);
        return HttpResponse.json({
          tenant_id: 'default',
          limit_usd: null,
          spent_usd: 0,
          remaining_usd: null,
        });
      }),
    );
    vi.spyOn(Math, 'random').mockReturnValue(1);
    await expect(client().budget.get({ timeout: 50, maxRetries: 1 })).resolves.toMatchObject({
      spent_usd: 0,
    });
    expect(calls).toBe(2);
    vi.restoreAllMocks();
  });

  it('rejects with APIUserAbortError when the caller aborts in flight', async () => {
    slowBudget(2_000);
    const controller = new AbortController();
    const pending = client().budget.get({ signal: controller.signal });
    setTimeout(() => controller.abort(), 20);
    await expect(pending).rejects.toBeInstanceOf(APIUserAbortError);
  });

  it('rejects at once for an already-aborted signal, and aborts the wait between retries', async () => {
    await expect(client().budget.get({ signal: AbortSignal.abort() })).rejects.toBeInstanceOf(
      APIUserAbortError,
    );
    expect(mock.state.requests).toHaveLength(0);

    mock.failNext('getBudget', 429, { headers: { 'Retry-After': '30' } });
    const controller = new AbortController();
    const pending = client().budget.get({ signal: controller.signal });
    setTimeout(() => controller.abort(), 50);
    await expect(pending).rejects.toBeInstanceOf(APIUserAbortError);
    expect(mock.state.requests).toHaveLength(1);
  });
});

// A body that sends `chunks` (one every `everyMs`), then fails as undici does on a reset socket, or stalls.
function body(chunks: string[], end: 'close' | 'reset' | 'stall', everyMs = 0): ReadableStream<Uint8Array> {
  const queue = [...chunks];
  return new ReadableStream({
    async pull(controller) {
      const chunk = queue.shift();
      if (chunk !== undefined) {
        if (everyMs) await delay(everyMs);
        return controller.enqueue(new TextEncoder().encode(chunk));
      }
      if (end === 'close') controller.close();
      else if (end === 'reset') controller.error(new TypeError('terminated'));
      else await new Promise(() => {});
    },
  });
}

async function readAll(stream: ReadableStream<Uint8Array>): Promise<string> {
  let text = '';
  const decoder = new TextDecoder();
  for await (const chunk of stream as unknown as AsyncIterable<Uint8Array>) text += decoder.decode(chunk);
  return text;
}

describe('response bodies', () => {
  const brokenCreates = (times: number) => {
    const keys: (string | null)[] = [];
    server.use(
      http.post(`${BASE_URL}/v1/training/jobs`, ({ request }) => {
        keys.push(request.headers.get('idempotency-key'));
        if (keys.length > times) return undefined; // on to the mock server
        return new HttpResponse(body(['{"id": "job_'], 'reset'), {
          status: 201,
          headers: { 'content-type': 'application/json' },
        });
      }),
    );
    return keys;
  };

  it('retries a body that fails mid-way with the same Idempotency-Key, then throws APIConnectionError', async () => {
    vi.spyOn(Math, 'random').mockReturnValue(1);
    const keys = brokenCreates(3);
    const error = await client({ maxRetries: 2 })
      .training.jobs.create(finetune)
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(APIConnectionError);
    expect((error as Error).cause).toMatchObject({ name: 'TypeError', message: 'terminated' });
    expect(keys).toHaveLength(3);
    expect(new Set(keys).size).toBe(1);

    const again = brokenCreates(1);
    await expect(client().training.jobs.create(finetune)).resolves.toMatchObject({ status: 'pending' });
    expect(again).toHaveLength(2);
    expect(again[1]).toBe(again[0]);
    vi.restoreAllMocks();
  });

  it('turns a 2xx body that is not JSON into UnparsableResponseError, not retried', async () => {
    let calls = 0;
    server.use(
      http.get(`${BASE_URL}/v1/budget`, () => {
        calls++;
        return HttpResponse.html('<html>502 from the proxy</html>', {
          headers: { 'x-request-id': 'req_html' },
        });
      }),
    );
    const error = await client()
      .budget.get()
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(UnparsableResponseError);
    expect(error).toBeInstanceOf(TuneryError);
    expect(error).toMatchObject({ status: 200, requestId: 'req_html' });
    expect((error as Error).message).toBe('200: Response body is not JSON: <html>502 from the proxy</html>');
    expect((error as Error).cause).toBeInstanceOf(SyntaxError);
    expect(calls).toBe(1);
  });
});

describe('downloads', () => {
  const serveOutput = (make: () => ReadableStream<Uint8Array>) =>
    server.use(http.get(`${BASE_URL}/v1/training/jobs/:id/output/:file`, () => new HttpResponse(make())));

  it('lets go of the caller’s signal once each body is read or cancelled', async () => {
    serveOutput(() => body(['ab', 'cd'], 'close'));
    const tunery = client();
    const controller = new AbortController();
    for (let i = 0; i < 20; i++) {
      const stream = await tunery.training.jobs.download('job_1', 'model.bin', { signal: controller.signal });
      // Not awaited: msw tees mocked bodies, and cancelling one branch of a tee waits for the other.
      if (i % 2) void stream.cancel();
      else expect(await readAll(stream)).toBe('abcd');
    }
    expect(getEventListeners(controller.signal, 'abort')).toHaveLength(0);
  });

  it('times out a stalled body, with the timeout applying to each chunk', async () => {
    serveOutput(() => body(['a', 'b', 'c', 'd'], 'close', 60));
    const tunery = client({ timeout: 150, maxRetries: 0 });
    expect(await readAll(await tunery.training.jobs.download('job_1', 'model.bin'))).toBe('abcd');

    serveOutput(() => body(['a'], 'stall'));
    const controller = new AbortController();
    const stream = await tunery.training.jobs.download('job_1', 'model.bin', { signal: controller.signal });
    const started = performance.now();
    await expect(readAll(stream)).rejects.toBeInstanceOf(APIConnectionTimeoutError);
    expect(performance.now() - started).toBeLessThan(1_000);
    expect(getEventListeners(controller.signal, 'abort')).toHaveLength(0);
  });

  it('aborts a body being read when the caller’s signal fires', async () => {
    serveOutput(() => body(['a'], 'stall'));
    const controller = new AbortController();
    const stream = await client().training.jobs.download('job_1', 'model.bin', { signal: controller.signal });
    setTimeout(() => controller.abort(), 20);
    await expect(readAll(stream)).rejects.toBeInstanceOf(APIUserAbortError);
  });
});

describe('configuration', () => {
  it('reads TUNERY_BASE_URL and TUNERY_API_KEY, else defaults to 127.0.0.1:8000', () => {
    vi.stubEnv('TUNERY_BASE_URL', 'http://example.test:9000/');
    vi.stubEnv('TUNERY_API_KEY', 'tk_env');
    const fromEnv = new Tunery();
    expect(fromEnv.baseURL).toBe('http://example.test:9000');
    expect(fromEnv.apiKey).toBe('tk_env');
    vi.stubEnv('TUNERY_BASE_URL', '');
    vi.stubEnv('TUNERY_API_KEY', '');
    const plain = new Tunery();
    expect(plain.baseURL).toBe('http://127.0.0.1:8000');
    expect(plain.apiKey).toBeNull();
    expect(plain.timeout).toBe(600_000);
    expect(plain.maxRetries).toBe(2);
  });

  it('sends the key, default headers and per-call headers', async () => {
    const tunery = client({ apiKey: 'tk_abc', defaultHeaders: { 'X-Team': 'ml', 'X-Drop': 'x' } });
    await tunery.budget.get({ headers: { 'X-Call': '1', 'X-Drop': null } });
    const [request] = mock.state.requests;
    expect(request?.headers).toMatchObject({ authorization: 'Bearer tk_abc', 'x-team': 'ml', 'x-call': '1' });
    expect(request?.headers).not.toHaveProperty('x-drop');
  });

  it('names itself in User-Agent and counts retries in x-tunery-retry-count', async () => {
    mock.failNext('getBudget', 503, { headers: { 'retry-after-ms': '0' }, times: 2 });
    await client().budget.get();
    const sent = mock.state.requests.filter((r) => r.operationId === 'getBudget');
    expect(sent.map((r) => r.headers['x-tunery-retry-count'])).toEqual(['0', '1', '2']);
    const { version } = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8'));
    expect(sent[0]?.headers['user-agent']).toBe(`tunery-sdk-js/${version}`);
  });

  it('refuses to run in a browser unless dangerouslyAllowBrowser is set', async () => {
    vi.stubGlobal('window', {});
    vi.stubGlobal('document', {});
    try {
      expect(() => new Tunery({ apiKey: 'tk' })).toThrow(/dangerouslyAllowBrowser/);
      const page = client({ dangerouslyAllowBrowser: true });
      await page.budget.get();
      // a page does not set User-Agent: it would need a CORS preflight the server may refuse
      expect(mock.state.requests.at(-1)?.headers['user-agent'] ?? '').not.toMatch(/tunery-sdk-js/);
    } finally {
      vi.unstubAllGlobals();
    }
    expect(new Tunery({ apiKey: 'tk' }).apiKey).toBe('tk');
  });

  it('uses a custom fetch and passes fetchOptions to it', async () => {
    const seen: { url: string; init: RequestInit | undefined }[] = [];
    const tunery = client({
      fetch: (input, init) => {
        seen.push({ url: input.url, init });
        return globalThis.fetch(input, init);
      },
      fetchOptions: { keepalive: false },
    });
    await tunery.budget.get({ fetchOptions: { cache: 'no-store' } });
    expect(seen).toHaveLength(1);
    expect(seen[0]?.url).toBe(`${BASE_URL}/v1/budget`);
    expect(seen[0]?.init).toEqual({ keepalive: false, cache: 'no-store' });
  });

  it('runs middleware registered with use() on every attempt', async () => {
    const tunery = client();
    const seen: string[] = [];
    const middleware: Middleware = {
      onRequest({ request }) {
        seen.push(`${request.method} ${new URL(request.url).pathname}`);
        request.headers.set('X-Trace', 'abc');
      },
    };
    tunery.use(middleware);
    mock.failNext('getTrainingStatus', 500, { headers: { 'retry-after-ms': '0' } });
    await tunery.training.status();
    expect(seen).toEqual(['GET /v1/training/status', 'GET /v1/training/status']);
    expect(mock.state.requests.map((r) => r.headers['x-trace'])).toEqual(['abc', 'abc']);
    tunery.eject(middleware);
    await tunery.training.status();
    expect(seen).toHaveLength(2);
  });

  it('logs retries at info and requests at debug, filtered by logLevel', async () => {
    const { lines, logger } = memoryLogger();
    mock.failNext('getBudget', 503, { headers: { 'retry-after-ms': '0' } });
    await client({ logger, logLevel: 'info' }).budget.get();
    expect(lines).toEqual([
      {
        level: 'info',
        message: '[tunery] GET /v1/budget → 503 service_unavailable. Retrying in 0 ms (2 left).',
      },
    ]);
    lines.length = 0;
    await client({ logger, logLevel: 'debug' }).budget.get();
    expect(lines.map((l) => l.level)).toEqual(['debug', 'debug']);
    lines.length = 0;
    await client({ logger, logLevel: 'off' }).budget.get();
    expect(lines).toEqual([]);
  });

  it('takes the log level from TUNERY_LOG', () => {
    vi.stubEnv('TUNERY_LOG', 'debug');
    expect(new Tunery().logLevel).toBe('debug');
    vi.stubEnv('TUNERY_LOG', 'loud');
    expect(new Tunery().logLevel).toBe('warn');
  });
});

describe('withResponse', () => {
  it('gives the parsed body, the Response and the request id', async () => {
    server.use(
      http.get(`${BASE_URL}/v1/version`, () =>
        HttpResponse.json({ version: '9', api_version: '0.1.0' }, { headers: { 'x-request-id': 'req_42' } }),
      ),
    );
    const { data, response, requestId } = await client().version().withResponse();
    expect(data).toEqual({ version: '9', api_version: '0.1.0' });
    expect(response.status).toBe(200);
    expect(requestId).toBe('req_42');
    expect((await client().version().asResponse()).headers.get('x-request-id')).toBe('req_42');
  });

  it('puts the request id on errors', async () => {
    server.use(
      http.get(`${BASE_URL}/v1/training/jobs/:id`, () =>
        HttpResponse.json(
          { error: { code: 'job_not_found', message: 'No job job_x.', param: 'job_id' } },
          { status: 404, headers: { 'x-request-id': 'req_404' } },
        ),
      ),
    );
    const error = await client()
      .training.jobs.retrieve('job_x')
      .catch((e: unknown) => e);
    expect(error).toMatchObject({
      status: 404,
      code: 'job_not_found',
      param: 'job_id',
      requestId: 'req_404',
    });
  });
});
