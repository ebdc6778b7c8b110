import type { APIPromise } from './core/api-promise.js';
import { type RequestOptions, TuneryClient } from './core/client.js';
import { Adapters } from './resources/adapters.js';
import { Admin } from './resources/admin.js';
import { BudgetResource } from './resources/budget.js';
import { Chat } from './resources/chat.js';
import { Datasets } from './resources/datasets.js';
import { Distiller } from './resources/distillation.js';
import { BaseModels, Models } from './resources/models.js';
import { Trainer } from './resources/training/trainer.js';
import { Trajectories } from './resources/trajectories.js';
import { Webhooks } from './resources/webhooks.js';
import type { Health, Version } from './types.js';

/**
 * The Tunery API client: every resource on one connection.
 *
 * ```ts
 * const tunery = new Tunery(); // TUNERY_BASE_URL, TUNERY_API_KEY
 * const job = await tunery.training.jobs.createAndWait({ base_model: 'tiny-llama', train_texts: ['…'] });
 * ```
 */
export class Tunery extends TuneryClient {
  readonly distillation: Distiller = new Distiller(this);
  readonly training: Trainer = new Trainer(this);
  readonly datasets: Datasets = new Datasets(this);
  readonly trajectories: Trajectories = new Trajectories(this);
  readonly adapters: Adapters = new Adapters(this);
  readonly models: Models = new Models(this);
  readonly baseModels: BaseModels = new BaseModels(this);
  readonly budget: BudgetResource = new BudgetResource(this);
  readonly admin: Admin = new Admin(this);
  readonly webhooks: Webhooks = new Webhooks(this);
  readonly chat: Chat = new Chat(this);

  /** Liveness and database check (no authentication). */
  health(options?: RequestOptions): APIPromise<Health> {
    return this.get('/v1/health', options);
  }

  /** Server and API version (no authentication). */
  version(options?: RequestOptions): APIPromise<Version> {
    return this.get('/v1/version', options);
  }
}
