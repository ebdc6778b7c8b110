import type { Knex } from 'knex';
import type { AppContext } from '../context.js';
import { badRequest } from '../errors.js';
import { reservableUsd, reserveBudget } from '../services/budget.js';
import { recordEvent } from './events.js';
import { notifyAfterCommit } from './notify.js';
import type { JobKind, JobRow } from './types.js';

export interface EnqueueInput {
  id: string;
  tenantId: string;
  kind: JobKind;
  /** finetune | train | contract | merge | benchmark | distill */
  type: string;
  method?: string | null;
  name?: string | null;
  description?: string | null;
  /** The resolved, public configuration (shown to users, turned into the worker's spec). */
  config: Record<string, unknown>;
  /** hf_token, teacher_api_key, in clear: sealed here, handed only to the worker that claims the job. */
  secrets?: Record<string, unknown>;
  baseModel?: string | null;
  datasetId?: string | null;
  parentJobId?: string | null;
  modelId?: string | null;
  requiredDevice?: 'cpu' | 'cuda' | 'mlx' | null;
  /** Workers scheduled together (a gang); default 1. */
  numNodes?: number;
  priority?: number;
  maxAttempts?: number;
  totalSteps?: number | null;
  /** The job's estimated cost, reserved against the tenant's budget (402 when it does not fit). */
  estimatedUsd?: number;
}

/**
 * Job `jobId`'s secrets sealed, as a jsonb parameter (no secrets is SQL NULL). A NUL is refused as
 * in any other text the API stores: no worker could send such a token anyway.
 */
export function sealedSecretsJson(
  ctx: Pick<AppContext, 'secretBox'>,
  jobId: string,
  secrets: Record<string, unknown> | undefined,
): string | null {
  if (secrets && JSON.stringify(secrets).includes('\\u0000')) {
    throw badRequest('Text may not contain the NUL character (\\u0000).');
  }
  const sealed = ctx.secretBox.seal(jobId, secrets);
  return sealed ? JSON.stringify(sealed) : null;
}

/** The phase a job shows before any worker touched it. */
const initialPhase = (kind: JobKind) => (kind === 'distillation' ? 'initializing' : 'queued');

/**
 * Puts a new job in the queue as `pending`, runnable now, and records its `created` event.
 * `db` may be a transaction: waiting claims are woken only once it commits, so they never look
 * for a row they cannot see yet. The job first reserves its estimated cost (services/budget.ts
 * reservableUsd) against the tenant's budget, in the same transaction as its row.
 */
export async function enqueueJob(
  ctx: Pick<
    AppContext,
    'knex' | 'dbKind' | 'queueSignal' | 'secretBox' | 'logger' | 'shuttingDown' | 'config'
  >,
  db: Knex | Knex.Transaction,
  input: EnqueueInput,
): Promise<JobRow> {
  const reservedUsd = reservableUsd(input.estimatedUsd ?? 0, ctx.config.pricePerGpuHour);
  // The budget's row lock must last until the job row commits: without a transaction it would not.
  if (!db.isTransaction) return ctx.knex.transaction((trx) => enqueueJob(ctx, trx, input));
  await reserveBudget(db as Knex.Transaction, input.tenantId, reservedUsd);
  const result = await db.raw(
    `
    INSERT INTO jobs (
      id, tenant_id, kind, type, method, status, phase, name, description, priority,
      config, secrets, base_model, dataset_id, parent_job_id, model_id, required_device, num_nodes,
      max_attempts, total_steps, cost_reserved, run_at, created_at, updated_at
    ) VALUES (
      :id, :tenantId, :kind, :type, :method, 'pending', :phase, :name, :description, :priority,
      :config::jsonb, :secrets::jsonb, :baseModel, :datasetId, :parentJobId, :modelId, :requiredDevice, :numNodes,
      :maxAttempts, :totalSteps, :reservedUsd,
      -- runnable at once; the database clock is the only clock the queue trusts
      now(), now(), now()
    )
    RETURNING *`,
    {
      id: input.id,
      tenantId: input.tenantId,
      kind: input.kind,
      type: input.type,
      method: input.method ?? null,
      phase: initialPhase(input.kind),
      name: input.name ?? null,
      description: input.description ?? null,
      priority: input.priority ?? 50,
      config: JSON.stringify(input.config),
      secrets: sealedSecretsJson(ctx, input.id, input.secrets),
      baseModel: input.baseModel ?? null,
      datasetId: input.datasetId ?? null,
      parentJobId: input.parentJobId ?? null,
      modelId: input.modelId ?? null,
      requiredDevice: input.requiredDevice ?? null,
      numNodes: input.numNodes ?? 1,
      maxAttempts: input.maxAttempts ?? 5,
      totalSteps: input.totalSteps ?? null,
      reservedUsd,
    },
  );
  const job = result.rows[0] as JobRow;
  await recordEvent(db, job.id, 'created', { type: job.type, method: job.method });
  notifyAfterCommit(ctx, db);
  return job;
}
