import type { APIPromise } from '../core/api-promise.js';
import type { RequestOptions } from '../core/client.js';
import type { PagePromise } from '../core/pagination.js';
import { APIResource } from '../core/resource.js';
import type {
  CreatedWebhook,
  Deleted,
  Webhook,
  WebhookCreateParams,
  WebhookDelivery,
  WebhookDeliveryList,
  WebhookList,
  WebhookListParams,
} from '../types.js';

/** Endpoints that hear when jobs end (`/v1/webhooks`): signed POSTs, retried, with a delivery log. */
export class Webhooks extends APIResource {
  /** Registers `url`; the answer's `secret` (shown only here) verifies each POST's `Tunery-Signature`. */
  create(body: WebhookCreateParams, options?: RequestOptions): APIPromise<CreatedWebhook> {
    return this._client.post('/v1/webhooks', { body, ...options });
  }

  list(query?: WebhookListParams, options?: RequestOptions): PagePromise<'webhooks', Webhook, WebhookList> {
    return this._client.getList('/v1/webhooks', 'webhooks', { query, ...options });
  }

  retrieve(webhookId: string, options?: RequestOptions): APIPromise<Webhook> {
    return this._client.get('/v1/webhooks/{webhook_id}', {
      pathParams: { webhook_id: webhookId },
      ...options,
    });
  }

  /** Stops all sending to it, pending retries included. */
  delete(webhookId: string, options?: RequestOptions): APIPromise<Deleted> {
    return this._client.delete('/v1/webhooks/{webhook_id}', {
      pathParams: { webhook_id: webhookId },
      ...options,
    });
  }

  /** The delivery log: one row per job announced, with its attempts and last answer. */
  deliveries(
    webhookId: string,
    query?: WebhookListParams,
    options?: RequestOptions,
  ): PagePromise<'deliveries', WebhookDelivery, WebhookDeliveryList> {
    return this._client.getList('/v1/webhooks/{webhook_id}/deliveries', 'deliveries', {
      pathParams: { webhook_id: webhookId },
      query,
      ...options,
    });
  }
}
