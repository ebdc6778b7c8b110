import { newId, newSecret } from '../src/ids.js';
import { completeJobs } from '../src/queue/complete.js';
import { type EnqueueInput, enqueueJob } from '../src/queue/enqueue.js';
import { START_ATTEMPT } from '../src/queue/lease.js';
import type { JobRow } from '../src/queue/types.js';
import type { TestServer } from './harness.js';

/** A LoRA fine-tune of the default tenant as the queue takes it, with `overrides`; a fresh id each call. */
export const finetuneInput = (overrides: Partial<EnqueueInput> = {}): EnqueueInput => ({
  id: newId('job'),
  tenantId: 'default',
  kind: 'training',
  type: 'finetune',
  method: 'lora',
  config: {},
  ...overrides,
});

export interface CompletedJobOptions {
  tenantId?: string;
  kind?: 'training' | 'distillation';
  /** `finetune` unless given. */
  type?: string;
  /** `lora` unless given (null for none). */
  method?: string | null;
  baseModel?: string;
  config?: Record<string, unknown>;
  /** Output files by name; one small LoRA adapter file unless given. */
  files?: Record<string, string>;
  /** What the worker reported. */
  result?: Record<string, unknown>;
}

/**
 * A job that completed with these output files: leased, then completed with `opts.result` as a
 * worker's completion is (src/queue/complete.ts). Its outputs become an adapter and / or a model,
 * and the job points at them.
 */
export async function completedJob(server: TestServer, opts: CompletedJobOptions = {}) {
  const { knex } = server.ctx;
  const id = newId('job');
  const tenantId = opts.tenantId ?? 'default';
  await enqueueJob(server.ctx, knex, {
    id,
    tenantId,
    kind: opts.kind ?? 'training',
    type: opts.type ?? 'finetune',
    method: opts.method === undefined ? 'lora' : opts.method,
    config: opts.config ?? {},
    baseModel: opts.baseModel ?? 'codellama-7b-instruct',
  });
  for (const [name, content] of Object.entries(
    opts.files ?? { 'adapter_model.safetensors': 'x'.repeat(1000) },
  )) {
    const stored = await server.ctx.storage.putBuffer(['jobs', id, 'outputs', name], content);
    await knex('files').insert({
      id: newId('file'),
      tenant_id: tenantId,
      owner_kind: 'job_output',
      owner_id: id,
      name,
      rel_path: stored.relPath,
      size_bytes: stored.sizeBytes,
      sha256: stored.sha256,
    });
  }
  const leaseToken = await leaseJob(server, id);
  const [outcome] = await completeJobs(server.ctx, [{ jobId: id, leaseToken, result: opts.result ?? {} }]);
  if (outcome?.error) throw outcome.error;
  const job = (await knex('jobs').where({ id }).first()) as JobRow;
  return { jobId: id, leaseToken, adapterName: job.adapter_name, modelId: job.output_model_id };
}

/** Leases a job to a test worker as a claim does (queue/claim.ts), its attempt row too; answers its lease token. */
export async function leaseJob(server: TestServer, jobId: string): Promise<string> {
  const leaseToken = newSecret('lease');
  await server.ctx.knex.transaction(async (trx) => {
    const leased = await trx.raw(
      `UPDATE jobs SET ${START_ATTEMPT} WHERE id = :jobId AND status = 'pending' RETURNING id`,
      {
        jobId,
        leaseToken,
        workerId: 'fixture-worker',
        leaseSeconds: 600,
      },
    );
    if (leased.rows.length !== 1) throw new Error(`leaseJob: ${jobId} is not a pending job`);
    await trx.raw(
      `INSERT INTO job_attempts (job_id, attempt, worker_id, lease_token)
       SELECT id, attempt, lease_owner, lease_token FROM jobs WHERE id = ?`,
      [jobId],
    );
  });
  return leaseToken;
}

/** One recorded chat trajectory of the default tenant with two LLM calls (two support tickets). */
export async function recordSupportTrajectory(server: TestServer): Promise<void> {
  await server.ctx.knex('trajectories').insert({
    id: newId('traj'),
    tenant_id: 'default',
    source: 'chat',
    status: 'completed',
    llm_calls: JSON.stringify([
      { user_prompt: 'My printer is on fire', response: 'Urgent: hardware' },
      { messages: [{ role: 'user', content: 'Reset my password' }], response: 'Account' },
    ]),
    provider_accesses: JSON.stringify([]),
    metadata: JSON.stringify({}),
    llm_call_count: 2,
  });
}
