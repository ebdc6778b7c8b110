import type { Request } from 'express';
import type { AppContext } from '../context.js';
import { invalidConfig, notFound } from '../errors.js';
import {
  type BodyOf,
  checkTenantParam,
  page,
  pathParam,
  queryInt,
  type Routes,
  type Schemas,
} from '../http.js';
import { newId } from '../ids.js';
import { cancelJob } from '../queue/cancel.js';
import { enqueueJob } from '../queue/enqueue.js';
import type { Db } from '../queue/lease.js';
import { resumeJob } from '../queue/resume.js';
import { storeDataset } from '../services/datasets.js';
import {
  type DistillationPlan,
  planDistillationJob,
  storePromptsInput,
} from '../services/distillation-request.js';
import { sendStoredFile } from '../services/downloads.js';
import { idempotent } from '../services/idempotency.js';
import { streamJob } from '../services/job-stream.js';
import { checkpointList, logPage, metricPage } from '../services/job-telemetry.js';
import { getJobRow, type JobRow, jobEvents, jobsOfKind, serializeDistillationJob } from '../services/jobs.js';
import { listPage, newestFirst } from '../services/paging.js';
import { type FileRow, jobOutputFiles, outputDirectory, outputFileView } from '../services/registry.js';
import { removingOnFailure } from '../storage.js';

/** The caller's distillation job; `tenant_id` in the query must be the key's own tenant. */
const jobOf = (req: Request, ctx: AppContext) =>
  getJobRow(ctx, checkTenantParam(req, req.query.tenant_id), pathParam(req, 'job_id'), 'distillation');

/** Seed 000's artifact paths, found among the job's output files by their conventional names. */
function artifactPaths(ctx: AppContext, jobId: string, files: FileRow[]) {
  const pathOf = (...names: string[]) => {
    const file = files.find((f) => names.includes(f.name));
    return file ? ctx.storage.shownPath(file.rel_path) : null;
  };
  const hasAdapter = files.some((f) => f.name.startsWith('adapter_'));
  const ggufPaths: Record<string, string> = {};
  for (const file of files) {
    const match = /^(?:model-)?(.+)\.gguf$/.exec(file.name);
    if (match) ggufPaths[match[1]!] = ctx.storage.shownPath(file.rel_path);
  }
  return {
    adapter_path: hasAdapter ? `${outputDirectory(ctx, jobId, files)}/` : null,
    gguf_paths: ggufPaths,
    tokenizer_path: pathOf('tokenizer.model', 'tokenizer.json'),
    config_path: pathOf('train_config.json', 'training_config.json'),
  };
}

/** The dataset the job's prompts come from: the one named, or new dataset `newDatasetId` of the prompts. */
async function promptsDatasetId(
  ctx: AppContext,
  trx: Db,
  tenantId: string,
  source: DistillationPlan['dataset'],
  label: string,
  newDatasetId: string,
): Promise<string> {
  if (source.kind === 'existing') return source.id;
  const records = source.prompts.map((text) => ({ text }));
  const input = {
    name: `${label} prompts`,
    records,
    source: source.source,
    trajectoryCount: source.trajectoryCount,
  };
  return (await storeDataset(ctx, tenantId, { ...input, id: newDatasetId, param: 'config.prompts' }, trx)).id;
}

export const distillationRoutes: Routes = {
  async createDistillationJob(req, res, ctx) {
    const body = req.body as BodyOf<'createDistillationJob'>;
    const tenantId = checkTenantParam(req, body.tenant_id);
    const { id } = await idempotent(ctx, req, 'distillation_jobs', 'job', async (id) => {
      const plan = await planDistillationJob(ctx, tenantId, body);
      // The new dataset's file and the job's prompts input are written inside the transaction but
      // outlive its rollback (a failed create leaves no job that could own anything under jobs/<id>).
      const newDatasetId = newId('ds');
      const written = [
        ['datasets', newDatasetId],
        ['jobs', id],
      ];
      await removingOnFailure(ctx.storage, written, () =>
        ctx.knex.transaction(async (trx) => {
          const datasetId = await promptsDatasetId(
            ctx,
            trx,
            tenantId,
            plan.dataset,
            body.name ?? id,
            newDatasetId,
          );
          await enqueueJob(ctx, trx, {
            id,
            tenantId,
            kind: 'distillation',
            type: 'distill',
            method: 'lora',
            name: body.name ?? null,
            description: body.description ?? null,
            config: { ...plan.config, dataset_id: datasetId },
            secrets: plan.secrets,
            baseModel: plan.studentName,
            datasetId,
            priority: body.priority,
            totalSteps: plan.config.training_steps as number,
            estimatedUsd: plan.estimatedUsd,
          });
          await storePromptsInput(ctx, trx, tenantId, id, plan.prompts);
        }),
      );
    });
    res
      .status(201)
      .json(
        serializeDistillationJob(
          await getJobRow(ctx, tenantId, id, 'distillation'),
        ) satisfies Schemas['DistillationJob'],
      );
  },

  async listDistillationJobs(req, res, ctx) {
    const tenantId = checkTenantParam(req, req.query.tenant_id);
    const body = await listPage(
      'jobs',
      jobsOfKind(ctx, tenantId, 'distillation', { status: req.query.status as string | undefined }),
      page(req),
      newestFirst(),
      (rows: JobRow[]) => rows.map(serializeDistillationJob),
    );
    res.json(body satisfies Schemas['DistillationJobList']);
  },

  async getDistillationJob(req, res, ctx) {
    res.json(serializeDistillationJob(await jobOf(req, ctx)) satisfies Schemas['DistillationJob']);
  },

  async cancelDistillationJob(req, res, ctx) {
    const tenantId = checkTenantParam(req, req.query.tenant_id);
    const job = await cancelJob(ctx, tenantId, 'distillation', pathParam(req, 'job_id'));
    res.json(serializeDistillationJob(job) satisfies Schemas['DistillationJob']);
  },

  async streamDistillationJob(req, res, ctx) {
    await streamJob(ctx, req, res, await jobOf(req, ctx));
  },

  async listDistillationJobEvents(req, res, ctx) {
    const job = await jobOf(req, ctx);
    res.json((await jobEvents(ctx, job.id, queryInt(req, 'since', 0))) satisfies Schemas['EventList']);
  },

  async listDistillationJobLogs(req, res, ctx) {
    res.json((await logPage(ctx, req, await jobOf(req, ctx))) satisfies Schemas['LogPage']);
  },

  async listDistillationJobMetrics(req, res, ctx) {
    res.json((await metricPage(ctx, req, await jobOf(req, ctx))) satisfies Schemas['MetricPage']);
  },

  async listDistillationJobCheckpoints(req, res, ctx) {
    res.json((await checkpointList(ctx, await jobOf(req, ctx))) satisfies Schemas['CheckpointList']);
  },

  async resumeDistillationJob(req, res, ctx) {
    const tenantId = checkTenantParam(req, req.query.tenant_id);
    const jobId = pathParam(req, 'job_id');
    const body = (req.body ?? {}) as Schemas['DistillationResumeRequest'];
    if (body.teacher_api_key !== undefined) {
      const { config } = await getJobRow(ctx, tenantId, jobId, 'distillation');
      if ((config?.teacher as { provider?: string } | undefined)?.provider === 'local')
        throw invalidConfig(
          'This job has a local teacher, which runs on the worker: teacher_api_key applies to endpoint teachers only.',
          'teacher_api_key',
        );
    }
    // a repeated resume (same idempotency key) answers the job instead of 409 not resumable
    await idempotent(ctx, req, `distillation_resume:${jobId}`, 'job', async () => {
      const secrets = body.teacher_api_key ? { teacher_api_key: body.teacher_api_key } : undefined;
      await resumeJob(ctx, tenantId, 'distillation', jobId, body.checkpoint, secrets);
    });
    const job = await getJobRow(ctx, tenantId, jobId, 'distillation');
    res.json(serializeDistillationJob(job) satisfies Schemas['DistillationJob']);
  },

  async getDistillationArtifacts(req, res, ctx) {
    const job = await jobOf(req, ctx);
    const files = (await jobOutputFiles(ctx.knex, job.tenant_id, [job.id])).get(job.id) ?? [];
    res.json({
      job_id: job.id,
      ...artifactPaths(ctx, job.id, files),
      files: files.map((f) => outputFileView(ctx, f, 'distillation')),
    } satisfies Schemas['DistillationArtifacts']);
  },

  async downloadDistillationArtifact(req, res, ctx) {
    const job = await jobOf(req, ctx);
    const name = pathParam(req, 'file');
    const file = await ctx.knex('files').where({ owner_kind: 'job_output', owner_id: job.id, name }).first();
    if (!file) throw notFound('artifact', name, 'file');
    await sendStoredFile(ctx, req, res, file);
  },
};
