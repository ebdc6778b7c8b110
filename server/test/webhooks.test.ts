import { createHmac } from 'node:crypto';
import { createServer, type IncomingHttpHeaders } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createFinetune, fakeWorker } from './fake-worker.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

interface Received {
  path: string;
  headers: IncomingHttpHeaders;
  body: string;
}

/** An endpoint on 127.0.0.1 that records every POST and answers the next status of `answers` (then 200). */
async function receiver(answers: number[] = []) {
  const received: Received[] = [];
  const server = createServer((req, res) => {
    let body = '';
    req.on('data', (chunk) => {
      body += chunk;
    });
    req.on('end', () => {
      received.push({ path: req.url ?? '', headers: req.headers, body });
      res.writeHead(answers.shift() ?? 200).end();
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return { port, received, close: () => new Promise<void>((resolve) => server.close(() => resolve())) };
}

describe.each(DATABASES)('webhooks on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db, {
      webhookAllowHosts: ['127.0.0.1'],
      webhookIntervalMs: 50,
      webhookRetryBaseSeconds: 0,
    });
  });
  afterAll(async () => {
    await server?.stop();
  });

  const create = async (json: Record<string, unknown>) => {
    const res = await server.api('/v1/webhooks', { method: 'POST', json });
    return { status: res.status, body: await res.json() };
  };

  type Delivery = { status: string; attempts: number };
  const finished = (d: Delivery) => d.status !== 'pending';

  /** The webhook's deliveries once there are some and each satisfies `settled` (default: not pending). */
  async function settledDeliveries(webhookId: string, settled: (d: Delivery) => boolean = finished) {
    for (let i = 0; i < 400; i++) {
      const page = await (await server.api(`/v1/webhooks/${webhookId}/deliveries`)).json();
      const deliveries = page.deliveries as Delivery[];
      if (deliveries.length > 0 && deliveries.every(settled)) return page.deliveries;
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    throw new Error('deliveries did not settle');
  }

  async function completeJob() {
    const id = await createFinetune(server);
    const worker = fakeWorker(server);
    const job = (await worker.claim())!;
    expect(job.job_id).toBe(id);
    expect((await worker.complete(id, job.lease_token, { steps: 1 })).status).toBe(200);
    return id;
  }

  it('posts a signed event for a job that ends, retrying until the endpoint accepts it', async () => {
    const endpoint = await receiver([500]);
    const created = await create({ url: `http://127.0.0.1:${endpoint.port}/hook`, description: 'ci' });
    expect(created.status).toBe(201);
    const { webhook, secret } = created.body;
    expect(secret).toMatch(/^whsec_/);
    expect(webhook).toMatchObject({
      events: ['job.completed', 'job.failed', 'job.cancelled'],
      description: 'ci',
    });

    const jobId = await completeJob();
    const [delivery] = await settledDeliveries(webhook.id);
    expect(delivery).toMatchObject({
      job_id: jobId,
      event: 'job.completed',
      status: 'delivered',
      attempts: 2,
      last_status_code: 200,
      last_error: null,
    });
    // The refused attempt and the accepted one carry the same event, each signed.
    expect(endpoint.received).toHaveLength(2);
    for (const post of endpoint.received) {
      expect(post.headers['tunery-delivery-id']).toBe(delivery.id);
      const [, t, v1] = /^t=(\d+),v1=([0-9a-f]{64})$/.exec(post.headers['tunery-signature'] as string) ?? [];
      expect(createHmac('sha256', secret).update(`${t}.${post.body}`).digest('hex')).toBe(v1);
      expect(JSON.parse(post.body)).toMatchObject({
        id: delivery.id,
        type: 'job.completed',
        data: { job_id: jobId, kind: 'training', type: 'finetune', status: 'completed', error: null },
      });
    }
    // A webhook's secret is shown once; getting it again does not show it.
    expect(await (await server.api(`/v1/webhooks/${webhook.id}`)).json()).toEqual(webhook);
    expect(JSON.stringify(await (await server.api('/v1/webhooks')).json())).not.toContain(secret);
    await server.api(`/v1/webhooks/${webhook.id}`, { method: 'DELETE' });
    await endpoint.close();
  });

  it('sends only the chosen endings, and nothing for jobs that ended before it existed', async () => {
    const before = await completeJob();
    const endpoint = await receiver();
    const { body } = await create({ url: `http://127.0.0.1:${endpoint.port}/`, events: ['job.cancelled'] });
    await completeJob();
    const cancelled = await createFinetune(server);
    expect((await server.api(`/v1/training/jobs/${cancelled}/cancel`, { method: 'POST' })).status).toBe(200);
    const deliveries = await settledDeliveries(body.webhook.id);
    expect(deliveries.map((d: { job_id: string; event: string }) => [d.job_id, d.event])).toEqual([
      [cancelled, 'job.cancelled'],
    ]);
    expect(endpoint.received.map((r) => JSON.parse(r.body).data.job_id)).not.toContain(before);
    await server.api(`/v1/webhooks/${body.webhook.id}`, { method: 'DELETE' });
    await endpoint.close();
  });

  it('never reaches a non-public address the operator did not allow', async () => {
    const literal = await create({ url: 'http://10.1.2.3/hook' });
    expect(literal.status).toBe(400);
    expect(literal.body.error).toMatchObject({ code: 'webhook_host_not_allowed', param: 'url' });
    // A name that resolves to loopback passes creation, and is refused when the connection is made.
    const endpoint = await receiver();
    const { body } = await create({ url: `http://localhost:${endpoint.port}/hook` });
    await completeJob();
    const [delivery] = await settledDeliveries(body.webhook.id, (d) => d.attempts >= 1);
    expect(delivery).toMatchObject({ status: 'pending', last_status_code: null });
    expect(delivery.last_error).toMatch(/non-public address/);
    expect(endpoint.received).toEqual([]);
    await server.api(`/v1/webhooks/${body.webhook.id}`, { method: 'DELETE' });
    await endpoint.close();
  });

  it('keeps webhooks per tenant and refuses what is not a URL', async () => {
    const { body } = await create({ url: 'https://hooks.example.com/x' });
    const theirs = await server.api(`/v1/webhooks/${body.webhook.id}`, { key: server.otherKey });
    expect(theirs.status).toBe(404);
    const list = await (await server.api('/v1/webhooks', { key: server.otherKey })).json();
    expect(list.webhooks).toEqual([]);
    for (const url of ['ftp://example.com/x', 'https://user:pw@example.com/x']) {
      const res = await create({ url });
      expect(res.status, url).toBe(400);
      expect(res.body.error.param).toBe('url');
    }
    const deleted = await server.api(`/v1/webhooks/${body.webhook.id}`, { method: 'DELETE' });
    expect(await deleted.json()).toEqual({ id: body.webhook.id, deleted: true });
    expect((await server.api(`/v1/webhooks/${body.webhook.id}`)).status).toBe(404);
  });

  it('answers a repeated create with the same webhook, and a new one once that was deleted', async () => {
    const json = { url: 'https://hooks.example.com/once', idempotency_key: 'hook-1' };
    const first = await create(json);
    const again = await create(json);
    expect(again.body.webhook.id).toBe(first.body.webhook.id);
    await server.api(`/v1/webhooks/${first.body.webhook.id}`, { method: 'DELETE' });
    const after = await create(json);
    expect(after.status).toBe(201);
    expect(after.body.webhook.id).not.toBe(first.body.webhook.id);
    await server.api(`/v1/webhooks/${after.body.webhook.id}`, { method: 'DELETE' });
  });
});
