import type { APIPromise } from '../core/api-promise.js';
import type { ClientOptions, RequestOptions, TuneryClient } from '../core/client.js';
import type { PagePromise } from '../core/pagination.js';
import { APIResource, clientFrom } from '../core/resource.js';
import type { ApiKey, ApiKeyCreateParams, ApiKeyList, ApiKeyListParams, CreatedApiKey } from '../types.js';

/**
 * API keys and worker tokens (`/v1/admin/keys`). Admin keys only: the operator's (tenant
 * `default`) manage every tenant's keys and the worker tokens, other admin keys their own tenant's.
 */
export class ApiKeys extends APIResource {
  /** Creates a key; `secret` is in this answer only (not idempotent: a repeat makes another key). */
  create(body: ApiKeyCreateParams, options?: RequestOptions): APIPromise<CreatedApiKey> {
    return this._client.post('/v1/admin/keys', { body, ...options });
  }

  /** Active keys, newest first (`include_inactive` adds revoked and expired ones); never their secrets. */
  list(query?: ApiKeyListParams, options?: RequestOptions): PagePromise<'keys', ApiKey, ApiKeyList> {
    return this._client.getList('/v1/admin/keys', 'keys', { query, ...options });
  }

  /** Revokes a key: it stops working at once on the server that answers, within 30 s on the others. */
  revoke(keyId: string, options?: RequestOptions): APIPromise<ApiKey> {
    return this._client.post('/v1/admin/keys/{key_id}/revoke', { pathParams: { key_id: keyId }, ...options });
  }
}

/** Operator tasks (`/v1/admin`): `tunery.admin.keys`. */
export class Admin extends APIResource {
  readonly keys: ApiKeys;

  constructor(clientOrOptions?: TuneryClient | ClientOptions) {
    super(clientFrom(clientOrOptions));
    this.keys = new ApiKeys(this._client);
  }
}
