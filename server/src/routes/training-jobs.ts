import type { Request } from 'express';
import type { AppContext } from '../context.js';
import { notFound } from '../errors.js';
import {
  type BodyOf,
  page,
  pathParam,
  queryInt,
  type Routes,
  type Schemas,
  sentBody,
  tenantOf,
} from '../http.js';
import { newId } from '../ids.js';
import { cancelJob } from '../queue/cancel.js';
import { enqueueJob } from '../queue/enqueue.js';
import { resumeJob } from '../queue/resume.js';
import type { JobRow } from '../queue/types.js';
import { storeDataset } from '../services/datasets.js';
import { sendStoredFile } from '../services/downloads.js';
import { idempotent } from '../services/idempotency.js';
import { streamJob } from '../services/job-stream.js';
import { checkpointList, logPage, metricPage } from '../services/job-telemetry.js';
import {
  getJobRow,
  getTrainingJobView,
  jobEvents,
  jobsOfKind,
  serializeTrainingJob,
} from '../services/jobs.js';
import { listPage, newestFirst } from '../services/paging.js';
import { finiteScores, jobOutputFiles, outputFileView, totalSizeMb } from '../services/registry.js';
import { type DataPlan, mergeJobPlan, mergeParent, planTrainingJob } from '../services/training-request.js';
import { removingOnFailure } from '../storage.js';

/** The caller's training job named in the path (404 job_not_found for anyone else's). */
const jobOf = (req: Request, ctx: AppContext) =>
  getJobRow(ctx, tenantOf(req), pathParam(req, 'job_id'), 'training');

/** Stores inline or file data as dataset `newDatasetId` (in the creating transaction); returns its id. */
async function datasetIdFor(
  ctx: AppContext,
  tenantId: string,
  data: DataPlan,
  trx: AppContext['knex'],
  newDatasetId: string,
) {
  if (!data) return null;
  if (data.kind === 'existing') return data.dataset.id;
  const stored = await storeDataset(
    ctx,
    tenantId,
    { id: newDatasetId, name: data.name, records: data.records, source: data.source, param: data.param },
    trx,
  );
  return stored.id;
}

const num = (value: unknown): number | null =>
  typeof value === 'number' && Number.isFinite(value) ? value : null;
const int = (value: unknown): number | null => {
  const n = num(value);
  return n == null ? null : Math.round(n);
};

/** The headline numbers of a finished job; whatever else the worker reported goes in `details`. */
function resultOf(job: JobRow): Schemas['TrainingResult'] {
  const r = job.results ?? {};
  const before = int(r.params_before);
  const after = int(r.params_after);
  return {
    job_id: job.id,
    ppl_baseline: num(r.ppl_baseline),
    ppl_final: num(r.ppl_final),
    ppl_delta_pct: num(r.ppl_delta_pct),
    loss_final: num(r.loss_final),
    eval_loss_final: num(r.eval_loss_final),
    params_before: before,
    params_after: after,
    params_delta: int(r.params_delta) ?? (before != null && after != null ? after - before : null),
    params_trainable: int(r.params_trainable),
    function_preservation: num(r.function_preservation),
    gpu_seconds: num(r.gpu_seconds),
    tokens_processed: int(r.tokens_processed),
    cost_usd: Number(Number(job.cost_accrued).toFixed(4)),
    scores: finiteScores(r.scores),
    details: r,
  };
}

/**
 * Plans, stores and enqueues a training job (idempotent on the request's key); returns its id.
 * Shared by createTrainingJob and the OpenAI-compatible fine-tuning route.
 */
export async function submitTrainingJob(
  ctx: AppContext,
  req: Request,
  tenantId: string,
  body: BodyOf<'createTrainingJob'>,
): Promise<string> {
  const { id } = await idempotent(ctx, req, 'training_jobs', 'job', async (id) => {
    const plan = await planTrainingJob(ctx, tenantId, body);
    // The new dataset's file is written inside the transaction but outlives its rollback.
    const newDatasetId = newId('ds');
    await removingOnFailure(ctx.storage, [['datasets', newDatasetId]], () =>
      ctx.knex.transaction(async (trx) => {
        const datasetId = await datasetIdFor(ctx, tenantId, plan.data, trx, newDatasetId);
        await enqueueJob(ctx, trx, { ...plan.job, id, tenantId, datasetId, estimatedUsd: plan.estimatedUsd });
      }),
    );
  });
  return id;
}

export const trainingJobRoutes: Routes = {
  async createTrainingJob(req, res, ctx) {
    const tenantId = tenantOf(req);
    // Layered settings must not see validator defaults (see sentBody).
    const id = await submitTrainingJob(ctx, req, tenantId, sentBody<'createTrainingJob'>(res));
    res.status(201).json(serializeTrainingJob(await getJobRow(ctx, tenantId, id, 'training'), ctx.storage));
  },

  async listTrainingJobs(req, res, ctx) {
    const body = await listPage(
      'jobs',
      jobsOfKind(ctx, tenantOf(req), 'training', {
        status: req.query.status as string | undefined,
        type: req.query.type as string | undefined,
      }),
      page(req),
      newestFirst(),
      (rows: JobRow[]) => rows.map((row) => serializeTrainingJob(row, ctx.storage)),
    );
    res.json(body satisfies Schemas['TrainingJobList']);
  },

  async getTrainingJob(req, res, ctx) {
    const job = await getTrainingJobView(ctx, tenantOf(req), pathParam(req, 'job_id'));
    res.json(serializeTrainingJob(job, ctx.storage) satisfies Schemas['TrainingJob']);
  },

  async deleteTrainingJob(req, res, ctx) {
    const job = await cancelJob(ctx, tenantOf(req), 'training', pathParam(req, 'job_id'));
    res.json(serializeTrainingJob(job, ctx.storage) satisfies Schemas['TrainingJob']);
  },

  async cancelTrainingJob(req, res, ctx) {
    const job = await cancelJob(ctx, tenantOf(req), 'training', pathParam(req, 'job_id'));
    res.json(serializeTrainingJob(job, ctx.storage) satisfies Schemas['TrainingJob']);
  },

  async resumeTrainingJob(req, res, ctx) {
    const tenantId = tenantOf(req);
    const jobId = pathParam(req, 'job_id');
    const body = (req.body ?? {}) as Schemas['ResumeRequest'];
    // a repeated resume (same idempotency key) answers the job instead of 409 not resumable
    await idempotent(ctx, req, `training_resume:${jobId}`, 'job', async () => {
      const secrets = body.hf_token ? { hf_token: body.hf_token } : undefined;
      await resumeJob(ctx, tenantId, 'training', jobId, body.checkpoint, secrets);
    });
    res.json(
      serializeTrainingJob(
        await getJobRow(ctx, tenantId, jobId, 'training'),
        ctx.storage,
      ) satisfies Schemas['TrainingJob'],
    );
  },

  async mergeTrainingJob(req, res, ctx) {
    const tenantId = tenantOf(req);
    const parentId = pathParam(req, 'job_id');
    const body = (req.body ?? {}) as Schemas['MergeRequest'];
    await getJobRow(ctx, tenantId, parentId, 'training');
    const { id } = await idempotent(
      ctx,
      req,
      `training_merge:${parentId}`,
      'job',
      async (id) => {
        const parent = await mergeParent(ctx, tenantId, parentId);
        // merging reads and writes the weights once: no training tokens, so it holds the budget's least
        await enqueueJob(ctx, ctx.knex, { ...mergeJobPlan(parent, body), id, tenantId });
      },
      body,
    );
    const job = serializeTrainingJob(await getJobRow(ctx, tenantId, id, 'training'), ctx.storage);
    res.status(201).json({ merge_job_id: id, job } satisfies Schemas['MergeResponse']);
  },

  async listTrainingJobLogs(req, res, ctx) {
    res.json((await logPage(ctx, req, await jobOf(req, ctx))) satisfies Schemas['LogPage']);
  },

  async listTrainingJobMetrics(req, res, ctx) {
    res.json((await metricPage(ctx, req, await jobOf(req, ctx))) satisfies Schemas['MetricPage']);
  },

  async streamTrainingJob(req, res, ctx) {
    await streamJob(ctx, req, res, await jobOf(req, ctx));
  },

  async listTrainingJobEvents(req, res, ctx) {
    const job = await jobOf(req, ctx);
    res.json((await jobEvents(ctx, job.id, queryInt(req, 'since', 0))) satisfies Schemas['EventList']);
  },

  async getTrainingJobResult(req, res, ctx) {
    const job = await jobOf(req, ctx);
    if (job.status !== 'completed') {
      throw notFound('result for job', `${job.id} yet (it is ${job.status})`, 'job_id');
    }
    res.json(resultOf(job) satisfies Schemas['TrainingResult']);
  },

  async listTrainingJobOutput(req, res, ctx) {
    const job = await jobOf(req, ctx);
    const files = (await jobOutputFiles(ctx.knex, job.tenant_id, [job.id])).get(job.id) ?? [];
    res.json({
      job_id: job.id,
      status: job.status,
      files: files.map((f) => outputFileView(ctx, f, 'training')),
      total_files: files.length,
      total_size_mb: totalSizeMb(files),
    } satisfies Schemas['OutputList']);
  },

  async downloadTrainingJobOutput(req, res, ctx) {
    const job = await jobOf(req, ctx);
    const name = pathParam(req, 'file');
    const file = await ctx.knex('files').where({ owner_kind: 'job_output', owner_id: job.id, name }).first();
    if (!file) throw notFound('output file', name, 'file');
    await sendStoredFile(ctx, req, res, file);
  },

  async listTrainingJobCheckpoints(req, res, ctx) {
    res.json((await checkpointList(ctx, await jobOf(req, ctx))) satisfies Schemas['CheckpointList']);
  },
};
