import type { APIPromise } from '../core/api-promise.js';
import type { RequestOptions } from '../core/client.js';
import { APIResource } from '../core/resource.js';
import type { Budget, BudgetUpdateParams } from '../types.js';

/** Your tenant's spending limit (`/v1/budget`); jobs that would exceed it fail with InsufficientCreditsError. */
export class BudgetResource extends APIResource {
  get(options?: RequestOptions): APIPromise<Budget> {
    return this._client.get('/v1/budget', options);
  }

  /** Admin keys only. `limit_usd: null` is unlimited. */
  update(body: BudgetUpdateParams, options?: RequestOptions): APIPromise<Budget> {
    return this._client.put('/v1/budget', { body, ...options });
  }
}
