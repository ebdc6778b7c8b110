/**
 * Webhooks: a tenant registers an endpoint, and when one of its jobs ends (completed, failed,
 * cancelled) the server POSTs a signed JSON event to it, retrying with backoff until the endpoint
 * answers 2xx or the attempts run out. Every delivery is a row: the delivery log and the retry queue.
 *
 * Deliveries are found from the jobs table (jobs that ended after the endpoint was created), not
 * pushed by each transition, so no transition can forget one and several server processes share the
 * work (a delivery is claimed by pushing its next attempt forward, then sent).
 *
 * The server must not become a client of hosts a tenant could not otherwise reach (SSRF): a webhook
 * host must resolve to public addresses, checked when the connection is made (so a DNS answer cannot
 * change in between), unless the operator allows the host by name (TUNERY_WEBHOOK_ALLOW_HOSTS).
 */
import { createHmac } from 'node:crypto';
import { type LookupAddress, lookup } from 'node:dns';
import http from 'node:http';
import https from 'node:https';
import { BlockList, isIP } from 'node:net';
import type { AppContext } from '../context.js';
import { badRequest } from '../errors.js';
import { iso, isoRequired, type Schemas } from '../http.js';
import { repeatEvery } from '../periodic.js';

export const WEBHOOK_EVENTS = ['job.completed', 'job.failed', 'job.cancelled'] as const;
const MAX_ATTEMPTS = 8;
const BATCH = 20;
const DELIVERY_TIMEOUT_MS = 10_000;
/** A claimed delivery is not claimed again for this long (its sender died: the next process retries). */
const CLAIM_SECONDS = 60;
/** Jobs that ended longer ago than this are not announced to an endpoint (after a long outage). */
const LOOKBACK_DAYS = 7;

export interface WebhookRow {
  id: string;
  tenant_id: string;
  url: string;
  events: string[];
  description: string | null;
  secret: unknown;
  created_at: Date;
}

interface DeliveryRow {
  id: string;
  webhook_id: string;
  job_id: string;
  event: string;
  status: 'pending' | 'delivered' | 'failed';
  attempts: number;
  next_attempt_at: Date;
  last_status_code: number | null;
  last_error: string | null;
  created_at: Date;
  delivered_at: Date | null;
}

export function webhookView(row: WebhookRow): Schemas['Webhook'] {
  return {
    id: row.id,
    url: row.url,
    events: row.events as Schemas['Webhook']['events'],
    description: row.description,
    created_at: isoRequired(row.created_at),
  };
}

export function deliveryView(row: DeliveryRow): Schemas['WebhookDelivery'] {
  return {
    id: row.id,
    webhook_id: row.webhook_id,
    job_id: row.job_id,
    event: row.event as Schemas['WebhookDelivery']['event'],
    status: row.status,
    attempts: row.attempts,
    next_attempt_at: row.status === 'pending' ? iso(row.next_attempt_at) : null,
    last_status_code: row.last_status_code,
    last_error: row.last_error,
    created_at: isoRequired(row.created_at),
    delivered_at: iso(row.delivered_at),
  };
}

/** The webhook's signing secret, in clear. */
export function webhookSecret(ctx: Pick<AppContext, 'secretBox'>, row: WebhookRow): string {
  return ctx.secretBox.open(row.id, row.secret as never).secret as string;
}

// ---------------------------------------------------------------- addresses

const NON_PUBLIC = new BlockList();
for (const [net, prefix] of [
  ['0.0.0.0', 8],
  ['10.0.0.0', 8],
  ['100.64.0.0', 10],
  ['127.0.0.0', 8],
  ['169.254.0.0', 16],
  ['172.16.0.0', 12],
  ['192.0.0.0', 24],
  ['192.168.0.0', 16],
  ['198.18.0.0', 15],
  ['224.0.0.0', 3],
] as const)
  NON_PUBLIC.addSubnet(net, prefix, 'ipv4');
for (const [net, prefix] of [
  ['::', 127],
  ['fc00::', 7],
  ['fe80::', 10],
  ['ff00::', 8],
] as const)
  NON_PUBLIC.addSubnet(net, prefix, 'ipv6');

function isPublicAddress(address: string): boolean {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  if (mapped) return !NON_PUBLIC.check(mapped[1] as string, 'ipv4');
  return !NON_PUBLIC.check(address, isIP(address) === 6 ? 'ipv6' : 'ipv4');
}

const hostOf = (url: URL) => url.hostname.replace(/^\[|\]$/g, '').toLowerCase();

/** A webhook URL the tenant may register: http(s), no credentials, not a literal non-public address. */
export function checkWebhookUrl(ctx: Pick<AppContext, 'config'>, raw: string): URL {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw badRequest(`url "${raw}" is not a URL.`, 'url');
  }
  if (!['http:', 'https:'].includes(url.protocol)) throw badRequest('url must be http or https.', 'url');
  if (url.username || url.password) throw badRequest('url may not carry credentials.', 'url');
  const host = hostOf(url);
  if (!ctx.config.webhookAllowHosts.includes(host) && isIP(host) && !isPublicAddress(host)) {
    throw badRequest(
      `url points to a non-public address; the operator can allow the host with TUNERY_WEBHOOK_ALLOW_HOSTS.`,
      'url',
      'webhook_host_not_allowed',
    );
  }
  return url;
}

/** dns.lookup that refuses non-public answers: used at connect time, so rebinding cannot slip past. */
function publicOnlyLookup(
  hostname: string,
  options: { all?: boolean },
  callback: (err: Error | null, address: string | LookupAddress[], family?: number) => void,
): void {
  lookup(hostname, { ...options, all: true }, (err, addresses) => {
    if (err) return callback(err, '');
    const refused = addresses.find((a) => !isPublicAddress(a.address));
    if (refused) return callback(new Error(`${hostname} resolves to a non-public address`), '');
    if (options.all) return callback(null, addresses);
    const [first] = addresses;
    callback(null, first?.address ?? '', first?.family);
  });
}

/** POSTs `body`; resolves with the status (redirects are answers, never followed). */
function post(ctx: Pick<AppContext, 'config'>, url: URL, body: string, headers: Record<string, string>) {
  const host = hostOf(url);
  const allowed = ctx.config.webhookAllowHosts.includes(host);
  if (!allowed && isIP(host) && !isPublicAddress(host)) {
    return Promise.reject(new Error(`${host} is not a public address`));
  }
  return new Promise<number>((resolve, reject) => {
    const request = (url.protocol === 'https:' ? https : http).request(
      url,
      {
        method: 'POST',
        headers: { ...headers, 'content-length': Buffer.byteLength(body) },
        timeout: DELIVERY_TIMEOUT_MS,
        ...(allowed ? {} : { lookup: publicOnlyLookup as never }),
      },
      (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
        res.on('error', reject);
      },
    );
    request.on('timeout', () =>
      request.destroy(new Error(`no answer within ${DELIVERY_TIMEOUT_MS / 1000} s`)),
    );
    request.on('error', reject);
    request.end(body);
  });
}

// ---------------------------------------------------------------- signing

/** `Tunery-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` with the webhook's secret. */
export function signatureHeader(secret: string, body: string, at = new Date()): string {
  const t = Math.floor(at.getTime() / 1000);
  const v1 = createHmac('sha256', secret).update(`${t}.${body}`).digest('hex');
  return `t=${t},v1=${v1}`;
}

// ---------------------------------------------------------------- dispatch

/** Starts the delivery loop; returns a function that stops it. */
export function startWebhookDispatcher(ctx: AppContext): () => Promise<void> {
  const loop = repeatEvery(
    ctx.config.webhookIntervalMs,
    () => dispatchWebhooks(ctx),
    (err) => ctx.logger.error({ err }, 'webhook pass failed; will retry'),
  );
  return () => loop.stop();
}

/** One pass: a delivery for every job that ended since its endpoint was created, then send what is due. */
export async function dispatchWebhooks(ctx: AppContext): Promise<void> {
  await enqueueEndedJobs(ctx);
  const due = await claimDue(ctx);
  await Promise.all(due.map((delivery) => deliver(ctx, delivery)));
}

async function enqueueEndedJobs(ctx: AppContext): Promise<void> {
  await ctx.knex.raw(
    `
    INSERT INTO webhook_deliveries (id, webhook_id, tenant_id, job_id, event, status, attempts, next_attempt_at)
    SELECT 'whd_' || substr(md5(w.id || '/' || j.id), 1, 24), w.id, w.tenant_id, j.id, 'job.' || j.status,
           'pending', 0, now()
    FROM webhooks w
    JOIN jobs j ON j.tenant_id = w.tenant_id
    WHERE j.status IN ('completed', 'failed', 'cancelled')
      AND j.finished_at >= w.created_at
      AND j.finished_at > now() - make_interval(days => ?)
      AND ('job.' || j.status) = ANY (w.events)
    ON CONFLICT (webhook_id, job_id) DO NOTHING`,
    [LOOKBACK_DAYS],
  );
}

async function claimDue(ctx: AppContext): Promise<DeliveryRow[]> {
  const result = await ctx.knex.raw(
    `
    UPDATE webhook_deliveries SET next_attempt_at = now() + make_interval(secs => ?)
    WHERE id IN (
      SELECT id FROM webhook_deliveries
      WHERE status = 'pending' AND next_attempt_at <= now()
      ORDER BY next_attempt_at LIMIT ? FOR UPDATE SKIP LOCKED)
    RETURNING *`,
    [CLAIM_SECONDS, BATCH],
  );
  return result.rows as DeliveryRow[];
}

async function deliver(ctx: AppContext, delivery: DeliveryRow): Promise<void> {
  const webhook = (await ctx.knex('webhooks').where('id', delivery.webhook_id).first()) as WebhookRow;
  const job = await ctx
    .knex('jobs')
    .where('id', delivery.job_id)
    .first('id', 'kind', 'type', 'status', 'error_code', 'error_message', 'finished_at');
  const body = JSON.stringify({
    id: delivery.id,
    type: delivery.event,
    created_at: isoRequired(delivery.created_at),
    data: {
      job_id: job.id,
      kind: job.kind,
      type: job.type,
      status: job.status,
      finished_at: iso(job.finished_at),
      error: job.error_code ? { code: job.error_code, message: job.error_message } : null,
    },
  });
  const headers = {
    'content-type': 'application/json',
    'user-agent': 'Tunery-Webhooks/1',
    'tunery-webhook-id': webhook.id,
    'tunery-delivery-id': delivery.id,
    'tunery-signature': signatureHeader(webhookSecret(ctx, webhook), body),
  };
  let status: number | null = null;
  let error: string | null = null;
  try {
    status = await post(ctx, new URL(webhook.url), body, headers);
    if (status < 200 || status >= 300) error = `answered ${status}`;
  } catch (err) {
    error = (err as Error).message.slice(0, 500);
  }
  await recordAttempt(ctx, delivery, status, error);
}

async function recordAttempt(
  ctx: AppContext,
  delivery: DeliveryRow,
  status: number | null,
  error: string | null,
): Promise<void> {
  const attempts = delivery.attempts + 1;
  const retryInSeconds = ctx.config.webhookRetryBaseSeconds * 2 ** (attempts - 1);
  await ctx
    .knex('webhook_deliveries')
    .where('id', delivery.id)
    .update({
      attempts,
      last_status_code: status,
      last_error: error,
      status: error === null ? 'delivered' : attempts >= MAX_ATTEMPTS ? 'failed' : 'pending',
      delivered_at: error === null ? ctx.knex.fn.now() : null,
      next_attempt_at: ctx.knex.raw('now() + make_interval(secs => ?)', [retryInSeconds]),
    });
}
