import type { APIPromise } from '../../core/api-promise.js';
import type { RequestOptions } from '../../core/client.js';
import type { PagePromise } from '../../core/pagination.js';
import { APIResource } from '../../core/resource.js';
import type {
  Deleted,
  Template,
  TemplateCreateParams,
  TemplateList,
  TemplateListParams,
} from '../../types.js';

/** Reusable job configurations (`/v1/training/templates`), built-in and custom. */
export class Templates extends APIResource {
  /** Built-in templates first, then yours. */
  list(
    query?: TemplateListParams,
    options?: RequestOptions,
  ): PagePromise<'templates', Template, TemplateList> {
    return this._client.getList('/v1/training/templates', 'templates', { query, ...options });
  }

  /** Saves a custom template; pass its name as `template` when creating a job. */
  create(body: TemplateCreateParams, options?: RequestOptions): APIPromise<Template> {
    return this._client.post('/v1/training/templates', { body, ...options });
  }

  retrieve(name: string, options?: RequestOptions): APIPromise<Template> {
    return this._client.get('/v1/training/templates/{template_name}', {
      pathParams: { template_name: name },
      ...options,
    });
  }

  /** Alias of `retrieve`. */
  get(name: string, options?: RequestOptions): APIPromise<Template> {
    return this.retrieve(name, options);
  }

  /** Deletes a custom template; a built-in one is a ConflictError. */
  delete(name: string, options?: RequestOptions): APIPromise<Deleted> {
    return this._client.delete('/v1/training/templates/{template_name}', {
      pathParams: { template_name: name },
      ...options,
    });
  }
}
