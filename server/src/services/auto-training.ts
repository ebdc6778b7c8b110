/**
 * Auto-training (seed 004): every new trajectory counts toward a threshold; once `threshold`
 * trajectories have arrived since the last run and `cooldown_hours` have passed, a dataset is built
 * from the new trajectories and a LoRA fine-tune of `base_model` is queued.
 */
import type { Knex } from 'knex';
import type { AppContext } from '../context.js';
import { ApiError, invalidConfig } from '../errors.js';
import { iso, type Schemas } from '../http.js';
import { newId } from '../ids.js';
import { enqueueJob } from '../queue/enqueue.js';
import type { JobRow } from '../queue/types.js';
import { resolveBaseModel } from './catalog.js';
import { buildDatasetFromTrajectories, removeDataset } from './datasets.js';
import { planTrainingJob, type TrainingJobCreate } from './training-request.js';

/** The defaults of a tenant that never configured auto-training (the table's column defaults). */
const DEFAULTS = { enabled: false, threshold: 100, cooldown_hours: 12 };

interface AutoTrainingRow {
  tenant_id: string;
  enabled: boolean;
  threshold: number;
  cooldown_hours: number;
  base_model: string | null;
  last_run_at: Date | null;
  last_job_id: string | null;
  trajectories_since_last_run: number;
}

export function autoConfigView(row: AutoTrainingRow | undefined): Schemas['AutoTrainingConfig'] {
  return {
    enabled: row?.enabled ?? DEFAULTS.enabled,
    threshold: row?.threshold ?? DEFAULTS.threshold,
    cooldown_hours: Number(row?.cooldown_hours ?? DEFAULTS.cooldown_hours),
    base_model: row?.base_model ?? null,
    last_run_at: iso(row?.last_run_at),
    last_job_id: row?.last_job_id ?? null,
    trajectories_since_last_run: row?.trajectories_since_last_run ?? 0,
  };
}

export async function getAutoConfig(
  ctx: Pick<AppContext, 'knex'>,
  tenantId: string,
): Promise<Schemas['AutoTrainingConfig']> {
  return autoConfigView(await ctx.knex('auto_training').where({ tenant_id: tenantId }).first());
}

/**
 * Changes the fields given. Enabling needs a base model that resolves (`400 invalid_config`
 * otherwise), so a run can never trigger without knowing what to train.
 */
export async function updateAutoConfig(
  ctx: Pick<AppContext, 'knex' | 'config'>,
  tenantId: string,
  update: Schemas['AutoTrainingConfigUpdate'],
): Promise<Schemas['AutoTrainingConfig']> {
  const current = await getAutoConfig(ctx, tenantId);
  const next = {
    ...current,
    ...Object.fromEntries(Object.entries(update).filter(([, v]) => v !== undefined)),
  };
  if (update.base_model !== undefined)
    await resolveBaseModel(ctx, tenantId, { base_model: update.base_model });
  if (next.enabled && !next.base_model) {
    throw invalidConfig(
      'Set base_model to enable auto-training: it names the model auto-runs fine-tune.',
      'base_model',
    );
  }
  const fields = {
    enabled: next.enabled,
    threshold: next.threshold,
    cooldown_hours: next.cooldown_hours,
    base_model: next.base_model,
  };
  await ctx
    .knex('auto_training')
    .insert({ tenant_id: tenantId, ...fields })
    .onConflict('tenant_id')
    .merge(Object.keys(fields));
  return getAutoConfig(ctx, tenantId);
}

/** Counts one new trajectory toward the threshold (in the transaction that records it). */
export async function countTrajectory(trx: Knex | Knex.Transaction, tenantId: string): Promise<void> {
  await trx.raw(
    `
    INSERT INTO auto_training (tenant_id, trajectories_since_last_run) VALUES (?, 1)
    ON CONFLICT (tenant_id) DO UPDATE
      SET trajectories_since_last_run = auto_training.trajectories_since_last_run + 1`,
    [tenantId],
  );
}

/** The due check, shared by the first look and the claiming update (database clock throughout). */
const DUE = `
  enabled
  AND base_model IS NOT NULL
  AND trajectories_since_last_run >= threshold
  AND (last_run_at IS NULL OR last_run_at <= now() - make_interval(secs => cooldown_hours * 3600))`;

/**
 * Starts an auto-run when it is due: enabled, `threshold` new trajectories, cooldown passed. The
 * run is planned exactly as `POST /v1/training/jobs {type: "finetune", base_model, dataset_id}`
 * would be (same defaults, same budget check) on a dataset built from the trajectories recorded
 * since the last run. The run is claimed by one conditional update, so of two concurrent
 * trajectories only one starts it (the other's dataset is removed again). A run that cannot start
 * (no usable call, budget exhausted, unknown model) is logged and retried with the next
 * trajectory; recording the trajectory never fails because of it.
 */
export async function maybeStartAutoTraining(ctx: AppContext, tenantId: string): Promise<JobRow | null> {
  const due = await ctx.knex.raw(`SELECT * FROM auto_training WHERE tenant_id = ? AND ${DUE}`, [tenantId]);
  const row = due.rows[0] as AutoTrainingRow | undefined;
  if (!row) return null;
  let datasetId: string | null = null;
  try {
    const dataset = await buildDatasetFromTrajectories(ctx, tenantId, {
      name: `auto-${new Date().toISOString().slice(0, 10)}`,
      limit: Math.min(100_000, row.trajectories_since_last_run),
      minLlmCalls: 1,
      since: row.last_run_at,
    });
    datasetId = dataset.id;
    const plan = await planTrainingJob(ctx, tenantId, {
      type: 'finetune',
      base_model: row.base_model!,
      dataset_id: dataset.id,
      run_name: `auto-training ${new Date().toISOString().slice(0, 16)}Z`,
    } as TrainingJobCreate);
    const jobId = newId('job');
    const job = await ctx.knex.transaction(async (trx) => {
      // Claims the run: only if still due and nobody ran it since we looked (last_job_id changes
      // with every run, so it tells without comparing timestamps across precisions).
      const claimed = await trx.raw(
        `
        UPDATE auto_training SET
          last_run_at = now(),
          last_job_id = ?,
          -- trajectories recorded meanwhile still count toward the next run
          trajectories_since_last_run = GREATEST(0, trajectories_since_last_run - ?)
        WHERE tenant_id = ? AND ${DUE} AND last_job_id IS NOT DISTINCT FROM ?
        RETURNING tenant_id`,
        [jobId, row.trajectories_since_last_run, tenantId, row.last_job_id],
      );
      if (claimed.rows.length === 0) return null;
      return enqueueJob(ctx, trx, {
        ...plan.job,
        id: jobId,
        tenantId,
        description: 'Started by auto-training from new trajectories.',
        datasetId: dataset.id,
        estimatedUsd: plan.estimatedUsd,
      });
    });
    if (!job) {
      await removeDataset(ctx, tenantId, dataset.id);
      return null;
    }
    ctx.logger.info({ tenantId, jobId: job.id, datasetId: dataset.id }, 'auto-training started a fine-tune');
    return job;
  } catch (err) {
    if (datasetId) await removeDataset(ctx, tenantId, datasetId).catch(() => {});
    const reason = err instanceof ApiError ? `${err.code}: ${err.message}` : String(err);
    ctx.logger.warn(
      { tenantId, reason },
      'auto-training could not start a run; will retry with the next trajectory',
    );
    return null;
  }
}
