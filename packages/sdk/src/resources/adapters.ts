import type { APIPromise } from '../core/api-promise.js';
import type { RequestOptions } from '../core/client.js';
import type { PagePromise } from '../core/pagination.js';
import { APIResource } from '../core/resource.js';
import type { Adapter, AdapterAction, AdapterList, AdapterListParams } from '../types.js';

/** Trained LoRA adapters (`/v1/adapters`) and which one is loaded for inference. */
export class Adapters extends APIResource {
  /** Newest first; the page's `body.current_adapter` names the loaded one. */
  list(query?: AdapterListParams, options?: RequestOptions): PagePromise<'adapters', Adapter, AdapterList> {
    return this._client.getList('/v1/adapters', 'adapters', { query, ...options });
  }

  retrieve(name: string, options?: RequestOptions): APIPromise<Adapter> {
    return this._client.get('/v1/adapters/{adapter_name}', {
      pathParams: { adapter_name: name },
      ...options,
    });
  }

  /** Alias of `retrieve`. */
  get(name: string, options?: RequestOptions): APIPromise<Adapter> {
    return this.retrieve(name, options);
  }

  /** Makes this the loaded adapter (one per tenant). */
  load(name: string, options?: RequestOptions): APIPromise<AdapterAction> {
    return this._client.post('/v1/adapters/{adapter_name}/load', {
      pathParams: { adapter_name: name },
      ...options,
    });
  }

  /** Unloads the loaded adapter; a BadRequestError (`no_adapter_loaded`) when none is. */
  unload(options?: RequestOptions): APIPromise<AdapterAction> {
    return this._client.post('/v1/adapters/unload', options);
  }

  /** Deletes the adapter and its files, unloading it first. */
  delete(name: string, options?: RequestOptions): APIPromise<AdapterAction> {
    return this._client.delete('/v1/adapters/{adapter_name}', {
      pathParams: { adapter_name: name },
      ...options,
    });
  }
}
