import type { Middleware } from 'openapi-fetch';
import type { APIPromise } from '../../core/api-promise.js';
import type { ClientOptions, RequestOptions, TuneryClient } from '../../core/client.js';
import { APIResource, clientFrom } from '../../core/resource.js';
import type {
  Estimate,
  EstimateParams,
  Recommendation,
  RecommendParams,
  TrainingStats,
  TrainingStatus,
} from '../../types.js';
import { AutoConfig } from './auto-config.js';
import { Jobs } from './jobs.js';
import { Templates } from './templates.js';

/**
 * Training (`/v1/training`): jobs, templates, planning helpers and auto-training. Use it from a
 * `Tunery` client (`tunery.training`) or on its own: `new Trainer({ apiKey, baseURL })`.
 */
export class Trainer extends APIResource {
  readonly jobs: Jobs;
  readonly templates: Templates;
  readonly autoConfig: AutoConfig;

  constructor(clientOrOptions?: TuneryClient | ClientOptions) {
    super(clientFrom(clientOrOptions));
    this.jobs = new Jobs(this._client);
    this.templates = new Templates(this._client);
    this.autoConfig = new AutoConfig(this._client);
  }

  /** Registers openapi-fetch middleware on this Trainer's client. */
  use(...middleware: Middleware[]): void {
    this._client.use(...middleware);
  }

  /** Memory (weights, gradients, optimizer, activations) and time for a configuration. */
  estimate(body: EstimateParams, options?: RequestOptions): APIPromise<Estimate> {
    return this._client.post('/v1/training/estimate', { body, ...options });
  }

  /** A starting configuration and safe windows for a model and dataset. */
  recommend(body: RecommendParams, options?: RequestOptions): APIPromise<Recommendation> {
    return this._client.post('/v1/training/recommend', { body, ...options });
  }

  /** Job counts by status and type, compute and cost totals. */
  stats(options?: RequestOptions): APIPromise<TrainingStats> {
    return this._client.get('/v1/training/stats', options);
  }

  /** Running/queued/completed/failed counts and whether any worker is online. */
  status(options?: RequestOptions): APIPromise<TrainingStatus> {
    return this._client.get('/v1/training/status', options);
  }
}
