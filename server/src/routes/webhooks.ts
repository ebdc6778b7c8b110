import type { AppContext } from '../context.js';
import { notFound } from '../errors.js';
import { type BodyOf, page, pathParam, type Routes, type Schemas, tenantOf } from '../http.js';
import { newSecret } from '../ids.js';
import { forgetIdempotentCreates, idempotent } from '../services/idempotency.js';
import { listPage, newestFirst } from '../services/paging.js';
import {
  checkWebhookUrl,
  deliveryView,
  WEBHOOK_EVENTS,
  type WebhookRow,
  webhookSecret,
  webhookView,
} from '../services/webhooks.js';

/** The tenant's webhook, or `404 not_found` (another tenant's does not exist for you). */
async function webhookOf(ctx: AppContext, tenantId: string, id: string): Promise<WebhookRow> {
  const row = await ctx.knex('webhooks').where({ id, tenant_id: tenantId }).first();
  if (!row) throw notFound('webhook', id, 'webhook_id');
  return row as WebhookRow;
}

export const webhookRoutes: Routes = {
  async createWebhook(req, res, ctx) {
    const tenantId = tenantOf(req);
    const body = req.body as BodyOf<'createWebhook'>;
    checkWebhookUrl(ctx, body.url);
    const { id } = await idempotent(ctx, req, 'createWebhook', 'wh', async (webhookId) => {
      const sealed = ctx.secretBox.seal(webhookId, { secret: newSecret('whsec') });
      await ctx.knex('webhooks').insert({
        id: webhookId,
        tenant_id: tenantId,
        url: body.url,
        events: body.events ?? [...WEBHOOK_EVENTS],
        description: body.description ?? null,
        secret: JSON.stringify(sealed),
      });
    });
    const row = await webhookOf(ctx, tenantId, id);
    const created = { webhook: webhookView(row), secret: webhookSecret(ctx, row) };
    res.status(201).json(created satisfies Schemas['CreatedWebhook']);
  },

  async listWebhooks(req, res, ctx) {
    const body = await listPage(
      'webhooks',
      ctx.knex('webhooks').where({ tenant_id: tenantOf(req) }),
      page(req),
      newestFirst(),
      (rows: WebhookRow[]) => rows.map(webhookView),
    );
    res.json(body satisfies Schemas['WebhookList']);
  },

  async getWebhook(req, res, ctx) {
    const row = await webhookOf(ctx, tenantOf(req), pathParam(req, 'webhook_id'));
    res.json(webhookView(row) satisfies Schemas['Webhook']);
  },

  async deleteWebhook(req, res, ctx) {
    const row = await webhookOf(ctx, tenantOf(req), pathParam(req, 'webhook_id'));
    // Its delivery log goes with it (ON DELETE CASCADE): nothing is sent for it any more.
    await ctx.knex('webhooks').where('id', row.id).delete();
    // A repeat of the create that made it makes a new one, not a 404.
    await forgetIdempotentCreates(ctx.knex, row.tenant_id, row.id);
    res.json({ id: row.id, deleted: true } satisfies Schemas['Deleted']);
  },

  async listWebhookDeliveries(req, res, ctx) {
    const tenantId = tenantOf(req);
    const webhook = await webhookOf(ctx, tenantId, pathParam(req, 'webhook_id'));
    const body = await listPage(
      'deliveries',
      ctx.knex('webhook_deliveries').where({ webhook_id: webhook.id, tenant_id: tenantId }),
      page(req),
      newestFirst(),
      (rows: Parameters<typeof deliveryView>[0][]) => rows.map(deliveryView),
    );
    res.json(body satisfies Schemas['WebhookDeliveryList']);
  },
};
