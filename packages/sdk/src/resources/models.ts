import type { APIPromise } from '../core/api-promise.js';
import type { RequestOptions } from '../core/client.js';
import type { PagePromise } from '../core/pagination.js';
import { APIResource } from '../core/resource.js';
import type {
  ActivateModelParams,
  ActivateModelResponse,
  BaseModel,
  BaseModelCreateParams,
  BaseModelList,
  BaseModelListParams,
  BenchmarkParams,
  BenchmarkResponse,
  Model,
  ModelList,
  ModelListParams,
  OllamaImportParams,
  OllamaImportResponse,
} from '../types.js';

/** Output models of your completed jobs (`/v1/models`). */
export class Models extends APIResource {
  list(query?: ModelListParams, options?: RequestOptions): PagePromise<'models', Model, ModelList> {
    return this._client.getList('/v1/models', 'models', { query, ...options });
  }

  retrieve(modelId: string, options?: RequestOptions): APIPromise<Model> {
    return this._client.get('/v1/models/{model_id}', { pathParams: { model_id: modelId }, ...options });
  }

  /** Alias of `retrieve`. */
  get(modelId: string, options?: RequestOptions): APIPromise<Model> {
    return this.retrieve(modelId, options);
  }

  /** Makes this the tenant's active model for inference. */
  activate(
    modelId: string,
    body?: ActivateModelParams,
    options?: RequestOptions,
  ): APIPromise<ActivateModelResponse> {
    return this._client.post('/v1/models/{model_id}/activate', {
      pathParams: { model_id: modelId },
      body,
      ...options,
    });
  }

  /** Registers the model's GGUF file with a loopback Ollama server, as `tunery-<tenant>/<model_name>`. */
  importOllama(
    modelId: string,
    body?: OllamaImportParams,
    options?: RequestOptions,
  ): APIPromise<OllamaImportResponse> {
    return this._client.post('/v1/models/{model_id}/import-ollama', {
      pathParams: { model_id: modelId },
      body,
      ...options,
    });
  }

  /** Queues a benchmark job; its scores land on the job's result and on the model. */
  benchmark(
    modelId: string,
    body?: BenchmarkParams,
    options?: RequestOptions,
  ): APIPromise<BenchmarkResponse> {
    return this._client.post('/v1/models/{model_id}/benchmark', {
      pathParams: { model_id: modelId },
      body,
      ...options,
    });
  }
}

/** The base-model catalog (`/v1/base-models`) jobs start from. */
export class BaseModels extends APIResource {
  list(
    query?: BaseModelListParams,
    options?: RequestOptions,
  ): PagePromise<'models', BaseModel, BaseModelList> {
    return this._client.getList('/v1/base-models', 'models', { query, ...options });
  }

  /** Registers a hub id or a directory on the workers' machines. */
  create(body: BaseModelCreateParams, options?: RequestOptions): APIPromise<BaseModel> {
    return this._client.post('/v1/base-models', { body, ...options });
  }
}
