import type { Knex } from 'knex';
import type { Migration } from './index.js';

const tables = [
  'idempotency_keys',
  'auto_training',
  'templates',
  'base_models',
  'models',
  'adapters',
  'trajectories',
  'datasets',
  'files',
  'job_events',
  'job_metrics',
  'job_logs',
  'job_attempts',
  'jobs',
  'workers',
  'api_keys',
  'tenants',
];

export const init: Migration = {
  name: '001_init',
  async up(knex: Knex) {
    await knex.schema.createTable('tenants', (t) => {
      t.text('id').primary();
      t.decimal('budget_limit_usd', 14, 4).nullable();
      t.text('loaded_adapter').nullable();
      t.text('active_model_id').nullable();
      t.timestamp('created_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
    });

    await knex.schema.createTable('api_keys', (t) => {
      t.text('id').primary();
      t.text('tenant_id').nullable().references('tenants.id');
      t.text('kind').notNullable(); // 'user' | 'worker'
      t.boolean('admin').notNullable().defaultTo(false);
      t.text('hash').notNullable().unique(); // sha256 of the secret; the secret itself is never stored
      t.text('prefix').notNullable(); // first characters, to recognise a key in listings
      t.text('name').nullable();
      t.timestamp('created_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
      t.timestamp('revoked_at', { useTz: true }).nullable();
    });

    await knex.schema.createTable('workers', (t) => {
      t.text('id').primary();
      t.jsonb('capabilities').notNullable();
      t.timestamp('last_seen_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
    });

    // The queue. One row per job of either kind; state transitions live in src/queue/.
    await knex.schema.createTable('jobs', (t) => {
      t.text('id').primary();
      t.text('tenant_id').notNullable().references('tenants.id');
      t.text('kind').notNullable(); // 'training' | 'distillation'
      t.text('type').notNullable(); // finetune | train | contract | merge | benchmark | distill
      t.text('method').nullable();
      t.text('status').notNullable().defaultTo('pending');
      t.text('phase').notNullable();
      t.text('name').nullable();
      t.text('description').nullable();
      t.integer('priority').notNullable().defaultTo(50);
      t.jsonb('config').notNullable(); // resolved, public configuration
      t.jsonb('secrets').notNullable().defaultTo('{}'); // hf_token, teacher_api_key: for workers only
      t.text('base_model').nullable();
      t.text('dataset_id').nullable();
      t.text('parent_job_id').nullable();
      t.text('model_id').nullable(); // the model a merge/benchmark job works on
      t.text('required_device').nullable(); // 'cpu' | 'cuda' when the user pinned one
      t.jsonb('progress').notNullable().defaultTo('{}');
      t.jsonb('results').notNullable().defaultTo('{}');
      t.jsonb('metrics').notNullable().defaultTo('{}');
      t.integer('current_step').notNullable().defaultTo(0);
      t.integer('total_steps').nullable();
      t.double('current_loss').nullable();
      t.double('learning_rate').nullable();
      t.integer('attempt').notNullable().defaultTo(0);
      t.integer('retries').notNullable().defaultTo(0);
      t.integer('max_attempts').notNullable().defaultTo(5);
      t.timestamp('run_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
      t.text('lease_token').nullable();
      t.text('lease_owner').nullable();
      t.timestamp('lease_expires_at', { useTz: true }).nullable();
      t.boolean('cancel_requested').notNullable().defaultTo(false);
      t.integer('last_checkpoint_step').notNullable().defaultTo(0);
      t.text('resume_checkpoint').nullable();
      t.text('output_model_id').nullable();
      t.text('adapter_name').nullable();
      t.decimal('cost_accrued', 14, 4).notNullable().defaultTo(0);
      // Compute is billed up to this moment; each fenced worker write bills now() - billed_until.
      t.timestamp('billed_until', { useTz: true }).nullable();
      t.text('error_code').nullable();
      t.text('error_message').nullable();
      t.integer('log_seq').notNullable().defaultTo(0);
      t.integer('event_seq').notNullable().defaultTo(0);
      t.timestamp('created_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
      t.timestamp('updated_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
      t.timestamp('started_at', { useTz: true }).nullable();
      t.timestamp('finished_at', { useTz: true }).nullable();
      t.index(['tenant_id', 'kind', 'created_at']);
      t.index(['parent_job_id']);
    });
    // The claim scans only runnable rows, best first.
    await knex.raw(
      `CREATE INDEX jobs_claimable ON jobs (priority DESC, run_at, created_at) WHERE status = 'pending'`,
    );
    await knex.raw(`CREATE INDEX jobs_running_leases ON jobs (lease_expires_at) WHERE status = 'running'`);

    await knex.schema.createTable('job_attempts', (t) => {
      t.text('job_id').notNullable().references('jobs.id').onDelete('CASCADE');
      t.integer('attempt').notNullable();
      t.text('worker_id').notNullable();
      t.text('lease_token').notNullable();
      t.text('outcome').notNullable().defaultTo('running'); // running | completed | failed | retry | lease_expired | cancelled
      t.text('error_code').nullable();
      t.text('error_message').nullable();
      t.timestamp('started_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
      t.timestamp('ended_at', { useTz: true }).nullable();
      t.primary(['job_id', 'attempt']);
    });

    await knex.schema.createTable('job_logs', (t) => {
      t.text('job_id').notNullable().references('jobs.id').onDelete('CASCADE');
      t.integer('seq').notNullable();
      t.timestamp('ts', { useTz: true }).notNullable();
      t.text('stream').notNullable();
      t.text('text').notNullable();
      t.primary(['job_id', 'seq']);
    });

    await knex.schema.createTable('job_metrics', (t) => {
      t.text('job_id').notNullable().references('jobs.id').onDelete('CASCADE');
      t.text('phase').notNullable();
      t.integer('step').notNullable();
      t.timestamp('ts', { useTz: true }).notNullable();
      t.jsonb('point').notNullable();
      t.primary(['job_id', 'phase', 'step']);
    });

    await knex.schema.createTable('job_events', (t) => {
      t.text('job_id').notNullable().references('jobs.id').onDelete('CASCADE');
      t.integer('seq').notNullable();
      t.timestamp('ts', { useTz: true }).notNullable();
      t.text('kind').notNullable();
      t.jsonb('payload').notNullable();
      t.text('dedupe_key').nullable(); // worker-sent events: re-sent batches are recognised by it
      t.primary(['job_id', 'seq']);
      t.unique(['job_id', 'dedupe_key']);
    });

    // Every stored byte: job outputs, checkpoints, dataset files. Paths are relative to the data dir.
    await knex.schema.createTable('files', (t) => {
      t.text('id').primary();
      t.text('tenant_id').notNullable().references('tenants.id');
      t.text('owner_kind').notNullable(); // 'job_output' | 'checkpoint' | 'dataset'
      t.text('owner_id').notNullable(); // job id or dataset id
      t.text('name').notNullable();
      t.text('rel_path').notNullable();
      t.bigInteger('size_bytes').notNullable();
      t.text('sha256').notNullable();
      t.integer('step').nullable();
      t.timestamp('created_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
      t.unique(['owner_kind', 'owner_id', 'name']);
    });

    await knex.schema.createTable('datasets', (t) => {
      t.text('id').primary();
      t.text('tenant_id').notNullable().references('tenants.id');
      t.text('name').notNullable();
      t.text('format').notNullable();
      t.integer('num_examples').notNullable();
      t.bigInteger('size_bytes').notNullable();
      t.bigInteger('tokens_est').notNullable();
      t.text('sha256').notNullable();
      t.text('source').notNullable();
      t.integer('trajectory_count').nullable();
      t.text('file_id').notNullable();
      t.timestamp('created_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
      t.index(['tenant_id', 'created_at']);
    });

    await knex.schema.createTable('trajectories', (t) => {
      t.text('id').primary();
      t.text('tenant_id').notNullable().references('tenants.id');
      t.text('source').notNullable();
      t.text('status').notNullable();
      t.timestamp('start_time', { useTz: true }).nullable();
      t.timestamp('end_time', { useTz: true }).nullable();
      t.jsonb('llm_calls').notNullable();
      t.jsonb('provider_accesses').notNullable();
      t.jsonb('metadata').notNullable();
      t.integer('llm_call_count').notNullable();
      t.timestamp('created_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
      t.index(['tenant_id', 'created_at']);
    });

    await knex.schema.createTable('adapters', (t) => {
      t.text('tenant_id').notNullable().references('tenants.id');
      t.text('name').notNullable();
      t.text('job_id').nullable();
      t.text('model_name').notNullable();
      t.text('description').nullable();
      t.jsonb('training_config').notNullable();
      t.jsonb('metrics').notNullable();
      t.timestamp('created_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
      t.primary(['tenant_id', 'name']);
      t.index(['tenant_id', 'job_id']); // registering and deleting go from the job to its adapter
    });

    await knex.schema.createTable('models', (t) => {
      t.text('id').primary();
      t.text('tenant_id').notNullable().references('tenants.id');
      t.text('job_id').notNullable();
      t.text('name').notNullable();
      t.text('kind').notNullable();
      t.text('base_model').nullable();
      t.bigInteger('params').nullable();
      t.text('provider_model').nullable();
      t.text('ollama_name').nullable();
      t.timestamp('imported_at', { useTz: true }).nullable();
      t.jsonb('benchmark').nullable();
      t.timestamp('created_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
      t.index(['tenant_id', 'created_at']);
      t.index(['tenant_id', 'job_id']); // registering goes from the job to its model
    });

    await knex.schema.createTable('base_models', (t) => {
      t.text('id').primary();
      t.text('tenant_id').nullable(); // null: shipped with the server, visible to all
      t.text('name').notNullable();
      t.text('source').notNullable();
      t.bigInteger('params').nullable();
      t.text('architecture').nullable();
      t.integer('context_length').nullable();
      t.timestamp('created_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
    });
    await knex.raw(`CREATE UNIQUE INDEX base_models_name ON base_models (COALESCE(tenant_id, ''), name)`);

    await knex.schema.createTable('templates', (t) => {
      t.text('tenant_id').notNullable().references('tenants.id');
      t.text('name').notNullable();
      t.text('description').notNullable().defaultTo('');
      t.jsonb('config').notNullable();
      t.timestamp('created_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
      t.primary(['tenant_id', 'name']);
    });

    await knex.schema.createTable('auto_training', (t) => {
      t.text('tenant_id').primary().references('tenants.id');
      t.boolean('enabled').notNullable().defaultTo(false);
      t.integer('threshold').notNullable().defaultTo(100);
      t.double('cooldown_hours').notNullable().defaultTo(12);
      t.text('base_model').nullable();
      t.timestamp('last_run_at', { useTz: true }).nullable();
      t.text('last_job_id').nullable();
      t.integer('trajectories_since_last_run').notNullable().defaultTo(0);
    });

    // One row per (tenant, operation, key): a repeat with the same body returns resource_id.
    await knex.schema.createTable('idempotency_keys', (t) => {
      t.text('tenant_id').notNullable();
      t.text('scope').notNullable();
      t.text('key').notNullable();
      t.text('request_hash').notNullable();
      t.text('resource_id').notNullable();
      // Null while the creating request is still running: the key row is committed before the object
      // it names, so a repeat that sees no completed_at must not try to load it (409 request_in_progress).
      t.timestamp('completed_at', { useTz: true }).nullable();
      t.timestamp('created_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
      t.primary(['tenant_id', 'scope', 'key']);
    });
  },
  async down(knex: Knex) {
    for (const table of tables) await knex.schema.dropTableIfExists(table);
  },
};
