import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createFinetune, fakeWorker } from './fake-worker.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

/** The value of one sample line (`name{labels} value`) of the text format, or undefined. */
function sample(text: string, name: string, labels = ''): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${name}${labels} `));
  return line === undefined ? undefined : Number(line.split(' ').at(-1));
}

describe.each(DATABASES)('GET /metrics on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db, { metricsToken: 'scrape-secret' });
  });
  afterAll(async () => {
    await server?.stop();
  });

  const scrape = async () => {
    const res = await server.api('/metrics', {
      key: null,
      headers: { authorization: 'Bearer scrape-secret' },
    });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/plain/);
    return res.text();
  };

  it('asks for the token when one is configured', async () => {
    expect((await server.api('/metrics', { key: null })).status).toBe(401);
    expect((await server.api('/metrics')).status).toBe(401); // an API key is not the metrics token
  });

  it('counts jobs by status and type, workers, uploads and request latency by operation', async () => {
    const id = await createFinetune(server);
    const before = await scrape();
    const pending = (t: string) => sample(t, 'tunery_jobs', '{status="pending",type="finetune"}') ?? 0;
    const worker = fakeWorker(server);
    const job = (await worker.claim())!;
    await worker.upload(id, job.lease_token, 'outputs', 'adapter_model.safetensors', Buffer.alloc(1234));
    const after = await scrape();
    expect(sample(after, 'tunery_jobs', '{status="running",type="finetune"}')).toBe(1);
    expect(pending(after)).toBe(pending(before) - 1);
    expect(sample(after, 'tunery_workers_online')).toBe(1);
    expect(
      sample(after, 'tunery_upload_bytes_total')! - (sample(before, 'tunery_upload_bytes_total') ?? 0),
    ).toBe(1234);
    const claims = sample(
      after,
      'tunery_http_request_duration_seconds_count',
      '{operation="claimJob",method="POST",status="200"}',
    );
    expect(claims).toBeGreaterThanOrEqual(1);
    expect(sample(after, 'tunery_inference_requests_in_flight')).toBe(0);
    expect(after).toContain('tunery_process_cpu_user_seconds_total');
    await worker.complete(id, job.lease_token);
  });
});
