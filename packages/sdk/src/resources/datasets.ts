import type { APIPromise } from '../core/api-promise.js';
import type { RequestOptions } from '../core/client.js';
import type { PagePromise } from '../core/pagination.js';
import { APIResource } from '../core/resource.js';
import { replayableFile, type Uploadable } from '../core/uploads.js';
import type {
  Dataset,
  DatasetBuildParams,
  DatasetCreateParams,
  DatasetList,
  DatasetListParams,
  DatasetUploadFields,
  Deleted,
} from '../types.js';

export interface DatasetUploadParams extends DatasetUploadFields {
  /** The JSONL file: a path (Node), bytes, a Blob/File, or a ReadableStream (buffered once, for retries). */
  file: Uploadable;
  /** File name sent in the multipart part. Default: the path's base name, the File's name, or `data.jsonl`. */
  filename?: string;
}

/** Training datasets (`/v1/datasets`): inline texts or records, JSONL uploads, or built from trajectories. */
export class Datasets extends APIResource {
  /** Stores inline `train_texts`, `records` or `jsonl` text. */
  create(body: DatasetCreateParams, options?: RequestOptions): APIPromise<Dataset> {
    return this._client.post('/v1/datasets', { body, ...options });
  }

  /** Uploads a JSONL file as multipart/form-data; the form is rebuilt for every attempt. */
  upload({ file, filename, ...fields }: DatasetUploadParams, options?: RequestOptions): APIPromise<Dataset> {
    const source = replayableFile(file, filename);
    const multipart = async () => {
      const form = new FormData();
      form.append('file', await source.blob(), source.name);
      for (const [key, value] of Object.entries(fields))
        if (value !== undefined) form.append(key, String(value));
      return form;
    };
    return this._client.post('/v1/datasets', { multipart, ...options });
  }

  /** Newest first. `await` for one page, or `for await` for every dataset. */
  list(query?: DatasetListParams, options?: RequestOptions): PagePromise<'datasets', Dataset, DatasetList> {
    return this._client.getList('/v1/datasets', 'datasets', { query, ...options });
  }

  retrieve(datasetId: string, options?: RequestOptions): APIPromise<Dataset> {
    return this._client.get('/v1/datasets/{dataset_id}', {
      pathParams: { dataset_id: datasetId },
      ...options,
    });
  }

  /** Alias of `retrieve`. */
  get(datasetId: string, options?: RequestOptions): APIPromise<Dataset> {
    return this.retrieve(datasetId, options);
  }

  /** Deletes the dataset and its file; a ConflictError while a pending or running job uses it. */
  delete(datasetId: string, options?: RequestOptions): APIPromise<Deleted> {
    return this._client.delete('/v1/datasets/{dataset_id}', {
      pathParams: { dataset_id: datasetId },
      ...options,
    });
  }

  /** Builds a chat dataset from recorded trajectories (one example per LLM call). */
  build(body?: DatasetBuildParams, options?: RequestOptions): APIPromise<Dataset> {
    return this._client.post('/v1/datasets/build', { body, ...options });
  }
}
