import type { Knex } from 'knex';
import { init } from './001_init.js';
import { secretsKeys } from './002_secrets_keys.js';
import { budgetReservations } from './004_budget_idem.js';
import { webhooks } from './005_webhooks.js';
import { inference } from './006_inference.js';
import { runnableIndex } from './007_runnable_index.js';
import { gangs } from './008_gangs.js';
import { paused } from './009_paused.js';
import { servingBackend } from './010_serving_backend.js';
import { oneRunnableIndex } from './011_one_runnable_index.js';
import { leanJobIndexes } from './012_lean_job_indexes.js';
import { outputLookupsByJob } from './013_output_lookups_by_job.js';
import { storableTimestamps } from './014_storable_timestamps.js';
import { runnableGangsIndex } from './015_runnable_gangs_index.js';

export interface Migration {
  name: string;
  up(knex: Knex): Promise<void>;
  down(knex: Knex): Promise<void>;
}

/** Every migration, in order. Add new ones at the end; never edit one that has shipped. */
export const migrations: Migration[] = [
  init,
  secretsKeys,
  budgetReservations,
  webhooks,
  inference,
  runnableIndex,
  gangs,
  paused,
  servingBackend,
  oneRunnableIndex,
  leanJobIndexes,
  outputLookupsByJob,
  storableTimestamps,
  runnableGangsIndex,
];
