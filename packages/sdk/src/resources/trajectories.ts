import type { APIPromise } from '../core/api-promise.js';
import type { RequestOptions } from '../core/client.js';
import type { PagePromise } from '../core/pagination.js';
import { APIResource } from '../core/resource.js';
import type {
  Trajectory,
  TrajectoryCreateParams,
  TrajectoryList,
  TrajectoryListParams,
  TrajectorySummary,
} from '../types.js';

/** Recorded agent trajectories (`/v1/trajectories`), the raw material of datasets. */
export class Trajectories extends APIResource {
  /** Records one trajectory with its LLM calls. */
  create(body: TrajectoryCreateParams, options?: RequestOptions): APIPromise<Trajectory> {
    return this._client.post('/v1/trajectories', { body, ...options });
  }

  /** Summaries, newest first. `await` for one page, or `for await` for every trajectory. */
  list(
    query?: TrajectoryListParams,
    options?: RequestOptions,
  ): PagePromise<'trajectories', TrajectorySummary, TrajectoryList> {
    return this._client.getList('/v1/trajectories', 'trajectories', { query, ...options });
  }

  /** One trajectory with its LLM calls. */
  retrieve(trajectoryId: string, options?: RequestOptions): APIPromise<Trajectory> {
    return this._client.get('/v1/trajectories/{trajectory_id}', {
      pathParams: { trajectory_id: trajectoryId },
      ...options,
    });
  }

  /** Alias of `retrieve`. */
  get(trajectoryId: string, options?: RequestOptions): APIPromise<Trajectory> {
    return this.retrieve(trajectoryId, options);
  }
}
