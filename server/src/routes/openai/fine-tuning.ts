/**
 * OpenAI's `fine_tuning/jobs`, backed by Tunery training jobs: a supervised job is a LoRA
 * fine-tune of `model` on `training_file` (a dataset id). Fields Tunery cannot honour are refused.
 */
import type { Request } from 'express';
import type { AppContext } from '../../context.js';
import { badRequest, conflict } from '../../errors.js';
import { type BodyOf, pathParam, queryInt, type Routes, type Schemas, tenantOf } from '../../http.js';
import { cancelJob } from '../../queue/cancel.js';
import { resumeJob } from '../../queue/resume.js';
import { getJobRow, type JobRow } from '../../services/jobs.js';
import { TRAINING_DEFAULTS } from '../../services/training-request.js';
import { submitTrainingJob } from '../training-jobs.js';
import { cursorPage, rowsAfter, trailingNumber, unixSeconds } from './paging.js';

/** Tunery's default learning rate, which `learning_rate_multiplier` multiplies. */
const BASE_LEARNING_RATE = TRAINING_DEFAULTS.learning_rate;

type Create = Schemas['OpenAIFineTuningJobCreate'];
type Hyperparameters = Schemas['OpenAIHyperparameters'];
type Job = Schemas['OpenAIFineTuningJob'];

const STATUS: Record<JobRow['status'], Job['status']> = {
  pending: 'queued',
  running: 'running',
  completed: 'succeeded',
  failed: 'failed',
  cancelled: 'cancelled',
};

/** A paused job is `paused` from the pause on (its run may still be stopping) until a resume. */
const statusOf = (row: JobRow): Job['status'] =>
  row.paused_at && (row.status === 'running' || row.status === 'cancelled') ? 'paused' : STATUS[row.status];

/** `auto` (or absent) leaves Tunery's default in place. */
const chosen = <T>(value: T | 'auto' | undefined): T | undefined => (value === 'auto' ? undefined : value);

/** Refuses what Tunery cannot do rather than accepting and ignoring it. */
function refuseUnsupported(body: Create): void {
  if (body.integrations?.length) throw badRequest('integrations are not supported.', 'integrations');
  if (body.metadata && Object.keys(body.metadata).length)
    throw badRequest('metadata is not supported.', 'metadata');
  if (body.method && body.method.type !== 'supervised')
    throw badRequest(`Only the supervised method is supported, not ${body.method.type}.`, 'method.type');
  if (body.hyperparameters && body.method?.supervised?.hyperparameters)
    throw badRequest(
      'Give hyperparameters in method.supervised only, not also at the top level.',
      'hyperparameters',
    );
}

/** OpenAI's request as Tunery's createTrainingJob body. */
function tuneryJobBody(body: Create): BodyOf<'createTrainingJob'> {
  const hp: Hyperparameters = body.method?.supervised?.hyperparameters ?? body.hyperparameters ?? {};
  const multiplier = chosen(hp.learning_rate_multiplier);
  return {
    type: 'finetune',
    method: 'lora',
    base_model: body.model,
    dataset_id: body.training_file,
    ...(body.validation_file != null ? { eval_dataset_id: body.validation_file } : {}),
    ...(body.suffix ? { run_name: body.suffix, output_name: body.suffix } : {}),
    training_config: {
      ...(chosen(hp.n_epochs) !== undefined ? { num_epochs: chosen(hp.n_epochs) } : {}),
      ...(chosen(hp.batch_size) !== undefined ? { batch_size: chosen(hp.batch_size) } : {}),
      ...(multiplier !== undefined ? { learning_rate: BASE_LEARNING_RATE * multiplier } : {}),
      ...(body.seed != null ? { seed: body.seed } : {}),
    },
  } as BodyOf<'createTrainingJob'>;
}

const numberOr = (value: unknown, fallback: number): number =>
  typeof value === 'number' && Number.isFinite(value) ? value : fallback;

/** A Tunery training job in OpenAI's shape. */
export function fineTuningJobView(row: JobRow): Job {
  const config = row.config ?? {};
  const training = (config.training ?? {}) as Record<string, unknown>;
  const hyperparameters = {
    n_epochs: numberOr(training.num_epochs, TRAINING_DEFAULTS.num_epochs),
    batch_size: numberOr(training.batch_size, TRAINING_DEFAULTS.batch_size),
    learning_rate_multiplier: numberOr(training.learning_rate, BASE_LEARNING_RATE) / BASE_LEARNING_RATE,
  };
  const succeeded = row.status === 'completed';
  const tokens = row.results?.tokens_processed;
  return {
    id: row.id,
    object: 'fine_tuning.job',
    created_at: unixSeconds(row.created_at),
    finished_at: row.finished_at ? unixSeconds(row.finished_at) : null,
    estimated_finish: null,
    model: row.base_model ?? '',
    fine_tuned_model: succeeded ? row.output_model_id : null,
    organization_id: row.tenant_id,
    status: statusOf(row),
    hyperparameters,
    training_file: row.dataset_id,
    validation_file: typeof config.eval_dataset_id === 'string' ? config.eval_dataset_id : null,
    result_files: [],
    trained_tokens: succeeded && typeof tokens === 'number' ? Math.round(tokens) : null,
    error: row.error_code ? { code: row.error_code, message: row.error_message ?? '', param: null } : null,
    seed: numberOr(config.seed, TRAINING_DEFAULTS.seed),
    user_provided_suffix: typeof config.run_name === 'string' ? config.run_name : null,
    integrations: null,
    metadata: null,
    method: { type: 'supervised', supervised: { hyperparameters } },
  };
}

const jobOf = (req: Request, ctx: AppContext) =>
  getJobRow(ctx, tenantOf(req), pathParam(req, 'fine_tuning_job_id'), 'training');

/** What an event says, from its Tunery kind and payload. */
function eventMessage(kind: string, payload: Record<string, unknown>): string {
  if (kind === 'phase') return `Phase: ${String(payload.phase)}.`;
  if (kind === 'checkpoint') return `Checkpoint saved at step ${String(payload.step)}.`;
  const detail = typeof payload.message === 'string' ? `: ${payload.message}` : '.';
  return `Job ${kind.replaceAll('_', ' ')}${detail}`;
}

export const openAIFineTuningRoutes: Routes = {
  async createOpenAIFineTuningJob(req, res, ctx) {
    const tenantId = tenantOf(req);
    const body = req.body as Create;
    refuseUnsupported(body);
    const id = await submitTrainingJob(ctx, req, tenantId, tuneryJobBody(body));
    res.json(fineTuningJobView(await getJobRow(ctx, tenantId, id, 'training')) satisfies Job);
  },

  async listOpenAIFineTuningJobs(req, res, ctx) {
    const limit = queryInt(req, 'limit', 20);
    const visible = ctx.knex('jobs').where({ tenant_id: tenantOf(req), kind: 'training' });
    const rows = await rowsAfter(visible, req.query.after as string | undefined, limit);
    const page = cursorPage(rows as unknown as JobRow[], limit, fineTuningJobView);
    res.json(page satisfies Schemas['OpenAIFineTuningJobList']);
  },

  async getOpenAIFineTuningJob(req, res, ctx) {
    res.json(fineTuningJobView(await jobOf(req, ctx)) satisfies Job);
  },

  async cancelOpenAIFineTuningJob(req, res, ctx) {
    const job = await cancelJob(ctx, tenantOf(req), 'training', pathParam(req, 'fine_tuning_job_id'));
    res.json(fineTuningJobView(job) satisfies Job);
  },

  async pauseOpenAIFineTuningJob(req, res, ctx) {
    const job = await jobOf(req, ctx);
    // pausing a paused job answers it unchanged; a finished one is refused by the cancel (409)
    const paused =
      statusOf(job) === 'paused'
        ? job
        : await cancelJob(ctx, tenantOf(req), 'training', job.id, { pause: true });
    res.json(fineTuningJobView(paused) satisfies Job);
  },

  async resumeOpenAIFineTuningJob(req, res, ctx) {
    const job = await jobOf(req, ctx);
    const status = statusOf(job);
    if (status !== 'paused') throw conflict(`Job ${job.id} is ${status}, not paused.`, 'job_not_resumable');
    if (job.status !== 'cancelled') {
      throw conflict(
        `Job ${job.id} is still stopping for its pause; resume it once it is paused.`,
        'job_not_resumable',
      );
    }
    res.json(
      fineTuningJobView(await resumeJob(ctx, tenantOf(req), 'training', job.id, undefined)) satisfies Job,
    );
  },

  async listOpenAIFineTuningEvents(req, res, ctx) {
    const job = await jobOf(req, ctx);
    const limit = queryInt(req, 'limit', 20);
    const prefix = `ftevent-${job.id}-`;
    const after = trailingNumber(req.query.after as string | undefined, prefix);
    const query = ctx
      .knex('job_events')
      .where('job_id', job.id)
      .orderBy('seq', 'desc')
      .limit(limit + 1);
    if (after !== undefined) query.andWhere('seq', '<', after);
    const page = cursorPage(await query, limit, (r) => ({
      id: `${prefix}${r.seq}`,
      object: 'fine_tuning.job.event' as const,
      created_at: unixSeconds(r.ts),
      level: r.kind === 'failed' ? ('error' as const) : ('info' as const),
      message: eventMessage(r.kind, r.payload ?? {}),
      type: 'message' as const,
      data: { kind: r.kind, ...r.payload },
    }));
    res.json(page satisfies Schemas['OpenAIFineTuningEventList']);
  },

  async listOpenAIFineTuningCheckpoints(req, res, ctx) {
    const job = await jobOf(req, ctx);
    const limit = queryInt(req, 'limit', 20);
    const prefix = `ftckpt-${job.id}-`;
    const after = trailingNumber(req.query.after as string | undefined, prefix);
    const query = ctx
      .knex('files')
      .where({ owner_kind: 'checkpoint', owner_id: job.id })
      .orderBy('step', 'desc')
      .limit(limit + 1);
    if (after !== undefined) query.andWhere('step', '<', after);
    const rows = await query;
    // the training loss recorded at each checkpoint's step, when the worker reported one
    const points = await ctx
      .knex('job_metrics')
      .where({ job_id: job.id, phase: 'train' })
      .whereIn(
        'step',
        rows.map((r) => r.step ?? 0),
      );
    const lossAt = new Map(points.map((p) => [Number(p.step), p.point?.loss]));
    const page = cursorPage(rows, limit, (r) => {
      const step = Number(r.step ?? 0);
      const loss = lossAt.get(step);
      return {
        id: `${prefix}${step}`,
        object: 'fine_tuning.job.checkpoint' as const,
        created_at: unixSeconds(r.created_at),
        fine_tuned_model_checkpoint: r.name as string,
        fine_tuning_job_id: job.id,
        metrics: { step, ...(typeof loss === 'number' ? { train_loss: loss } : {}) },
        step_number: step,
      };
    });
    res.json(page satisfies Schemas['OpenAIFineTuningCheckpointList']);
  },
};
