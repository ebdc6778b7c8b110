import type { components } from '../../generated/api.js';
import { badJson, idempotencyKeyOf, type MockContext, pageOf, remember, replayed } from '../context.js';
import { MockHttpError, notFound } from '../errors.js';
import { type MockState, newId, now } from '../state.js';

type Schemas = components['schemas'];

const ALL_EVENTS: Schemas['WebhookEvent'][] = ['job.completed', 'job.failed', 'job.cancelled'];

/**
 * Webhooks as the server keeps them. The mock sends no HTTP: its delivery log shows every job that
 * ended after the webhook was created as delivered on the first attempt.
 */
export function webhookHandlers(ctx: MockContext) {
  const { router, state } = ctx;

  router.get('/v1/webhooks', 'listWebhooks', ({ request, response }) => {
    const all = [...state.webhooks.values()].map((w) => w.webhook).reverse();
    const { page, ...paging } = pageOf(all, request.url);
    return response(200).json({ webhooks: page, ...paging });
  });

  router.post('/v1/webhooks', 'createWebhook', async ({ request, response }) => {
    const body = await request.json().catch(badJson);
    const key = idempotencyKeyOf(request, body);
    const earlier = replayed(ctx, 'createWebhook', key, body);
    if (earlier) return response(201).json(stored(state, earlier.id));
    let url: URL;
    try {
      url = new URL(body.url);
    } catch {
      throw new MockHttpError(400, 'invalid_request', `url "${body.url}" is not a URL.`, 'url');
    }
    if (!['http:', 'https:'].includes(url.protocol)) {
      throw new MockHttpError(400, 'invalid_request', 'url must be http or https.', 'url');
    }
    const id = newId(state, 'wh');
    const created = {
      webhook: {
        id,
        url: body.url,
        events: body.events ?? ALL_EVENTS,
        description: body.description ?? null,
        created_at: now(),
      },
      secret: `whsec_mock${id.slice(3)}`,
    };
    state.webhooks.set(id, created);
    remember(ctx, 'createWebhook', key, body, { kind: 'webhook', id });
    return response(201).json(created);
  });

  router.get('/v1/webhooks/{webhook_id}', 'getWebhook', ({ params, response }) =>
    response(200).json(stored(state, params.webhook_id).webhook),
  );

  router.delete('/v1/webhooks/{webhook_id}', 'deleteWebhook', ({ params, response }) => {
    stored(state, params.webhook_id);
    state.webhooks.delete(params.webhook_id);
    return response(200).json({ id: params.webhook_id, deleted: true });
  });

  router.get(
    '/v1/webhooks/{webhook_id}/deliveries',
    'listWebhookDeliveries',
    ({ params, request, response }) => {
      const { webhook } = stored(state, params.webhook_id);
      const { page, ...paging } = pageOf(deliveriesOf(state, webhook), request.url);
      return response(200).json({ deliveries: page, ...paging });
    },
  );
}

function stored(state: MockState, id: string) {
  const found = state.webhooks.get(id);
  if (!found) throw notFound('webhook', id, 'webhook_id');
  return found;
}

function deliveriesOf(state: MockState, webhook: Schemas['Webhook']): Schemas['WebhookDelivery'][] {
  const jobs = [...state.trainingJobs.values(), ...state.distillationJobs.values()];
  return jobs
    .filter((job) => job.finished_at && job.finished_at >= webhook.created_at)
    .filter((job) => webhook.events.includes(`job.${job.status}` as Schemas['WebhookEvent']))
    .map((job) => ({
      id: `whd_${job.id.slice(4)}`,
      webhook_id: webhook.id,
      job_id: job.id,
      event: `job.${job.status}` as Schemas['WebhookEvent'],
      status: 'delivered' as const,
      attempts: 1,
      next_attempt_at: null,
      last_status_code: 200,
      last_error: null,
      created_at: job.finished_at as string,
      delivered_at: job.finished_at as string,
    }))
    .reverse();
}
