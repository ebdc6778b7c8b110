import type { APIPromise } from '../../core/api-promise.js';
import type { RequestOptions } from '../../core/client.js';
import { APIResource } from '../../core/resource.js';
import type {
  AutoTrainingConfig,
  AutoTrainingConfigResponse,
  AutoTrainingConfigUpdateParams,
} from '../../types.js';

/** Auto-training (`/v1/training/auto/config`): fine-tune once enough new trajectories arrive. */
export class AutoConfig extends APIResource {
  get(options?: RequestOptions): APIPromise<AutoTrainingConfig> {
    return this._client.get('/v1/training/auto/config', options);
  }

  /** Fields left out keep their values. */
  update(
    body: AutoTrainingConfigUpdateParams,
    options?: RequestOptions,
  ): APIPromise<AutoTrainingConfigResponse> {
    return this._client.put('/v1/training/auto/config', { body, ...options });
  }
}
