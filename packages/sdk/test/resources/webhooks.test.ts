import { createHmac } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { verifyWebhookSignature } from '../../src/index.js';
import { useMockServer } from '../helpers.js';

const { mock, client } = useMockServer();

/** What the server sends: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">. */
const sign = (secret: string, body: string, t: number) =>
  `t=${t},v1=${createHmac('sha256', secret).update(`${t}.${body}`).digest('hex')}`;

describe('verifyWebhookSignature', () => {
  const secret = 'whsec_test';
  const body = JSON.stringify({ id: 'whd_1', type: 'job.completed', data: { job_id: 'job_1' } });
  const now = new Date('2026-12-04T00:00:00Z');
  const t = now.getTime() / 1000;

  it('accepts the server’s signature of the exact body', async () => {
    expect(await verifyWebhookSignature(body, sign(secret, body, t), secret, { now })).toBe(true);
  });

  it('refuses another body, another secret, an old signature and a malformed header', async () => {
    const header = sign(secret, body, t);
    expect(await verifyWebhookSignature(`${body} `, header, secret, { now })).toBe(false);
    expect(await verifyWebhookSignature(body, header, 'whsec_other', { now })).toBe(false);
    expect(await verifyWebhookSignature(body, sign(secret, body, t - 301), secret, { now })).toBe(false);
    expect(
      await verifyWebhookSignature(body, sign(secret, body, t - 301), secret, { now, toleranceSeconds: 600 }),
    ).toBe(true);
    for (const bad of [undefined, null, '', 'v1=abc', `t=${t}`]) {
      expect(await verifyWebhookSignature(body, bad, secret, { now })).toBe(false);
    }
  });
});

describe('webhooks', () => {
  it('creates, lists, shows deliveries of jobs that end, and deletes', async () => {
    const tunery = client();
    const { webhook, secret } = await tunery.webhooks.create({ url: 'https://ci.example.com/hook' });
    expect(secret).toMatch(/^whsec_/);
    expect(webhook.events).toEqual(['job.completed', 'job.failed', 'job.cancelled']);
    const job = await tunery.training.jobs.create({ base_model: 'tiny-llama', train_texts: ['hi'] });
    mock.advanceJob(job.id, 'completed');
    const deliveries = [];
    for await (const d of tunery.webhooks.deliveries(webhook.id)) deliveries.push(d);
    expect(deliveries).toMatchObject([{ job_id: job.id, event: 'job.completed', status: 'delivered' }]);
    expect((await tunery.webhooks.list()).data.map((w) => w.id)).toEqual([webhook.id]);
    expect(await tunery.webhooks.delete(webhook.id)).toEqual({ id: webhook.id, deleted: true });
  });
});
