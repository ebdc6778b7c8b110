import type { RequestBodyOf } from '../../core/types.js';
import type { components } from '../../generated/api.js';
import {
  badJson,
  idempotencyKeyOf,
  intParam,
  type MockContext,
  newestFirst,
  optionalJson,
  pageOf,
  remember,
  replayed,
} from '../context.js';
import { MockHttpError, notFound } from '../errors.js';
import { fileResponse } from '../files.js';
import {
  appendEvent,
  appendLog,
  COST_PER_STEP,
  chargeable,
  requestCancel,
  tickTrainingJob,
} from '../simulate.js';
import { type MockState, newId, now } from '../state.js';
import { jobStreamResponse } from '../stream.js';
import { storeDataset } from './datasets.js';

type Schemas = components['schemas'];
type TrainingJob = Schemas['TrainingJob'];

/** Steps a job runs when its configuration does not say. */
export const DEFAULT_TOTAL_STEPS = 60;

export function trainingHandlers(ctx: MockContext) {
  const { router, state } = ctx;

  router.post('/v1/training/jobs', 'createTrainingJob', async ({ request, response }) => {
    const body = await request.json().catch(badJson);
    const key = idempotencyKeyOf(request, body);
    const earlier = replayed(ctx, 'createTrainingJob', key, body);
    if (earlier) return response(201).json(trainingJob(state, earlier.id));
    const job = createTrainingJob(state, body);
    remember(ctx, 'createTrainingJob', key, body, { kind: 'trainingJob', id: job.id });
    return response(201).json(job);
  });

  router.get('/v1/training/jobs', 'listTrainingJobs', ({ request, query, response }) => {
    const status = query.get('status');
    const type = query.get('type');
    const jobs = newestFirst(state.trainingJobs.values()).filter(
      (j) => (!status || j.status === status) && (!type || j.type === type),
    );
    const { page, ...paging } = pageOf(jobs, request.url);
    return response(200).json({ jobs: page, ...paging });
  });

  router.get('/v1/training/jobs/{job_id}', 'getTrainingJob', ({ params, response }) => {
    const job = trainingJob(state, params.job_id);
    // The caller sees the job as it is; the work happens between this poll and the next.
    const seen = structuredClone(job);
    if (ctx.autoAdvance) tickTrainingJob(state, job, ctx.settings);
    return response(200).json(seen);
  });

  router.delete('/v1/training/jobs/{job_id}', 'deleteTrainingJob', ({ params, response }) => {
    const job = trainingJob(state, params.job_id);
    requestCancel(state, job);
    return response(200).json(job);
  });

  router.post('/v1/training/jobs/{job_id}/cancel', 'cancelTrainingJob', ({ params, response }) => {
    const job = trainingJob(state, params.job_id);
    requestCancel(state, job);
    return response(200).json(job);
  });

  router.post(
    '/v1/training/jobs/{job_id}/resume',
    'resumeTrainingJob',
    async ({ params, request, response }) => {
      const job = trainingJob(state, params.job_id);
      const body = await optionalJson<Schemas['ResumeRequest']>(request);
      const scope = `resumeTrainingJob/${job.id}` as const;
      const key = idempotencyKeyOf(request, body);
      if (replayed(ctx, scope, key, body)) return response(200).json(job);
      const checkpoint = resumeCheckpoint(state, job, body?.checkpoint);
      Object.assign(job, {
        status: 'pending',
        phase: 'queued',
        current_step: checkpoint.step,
        progress: job.total_steps ? Math.round((1000 * checkpoint.step) / job.total_steps) / 10 : 0,
        error: null,
        error_message: null,
        finished_at: null,
        cancel_requested: false,
        updated_at: now(),
      } satisfies Partial<TrainingJob>);
      appendEvent(state, job.id, 'resumed', { checkpoint: checkpoint.name, step: checkpoint.step });
      remember(ctx, scope, key, body, { kind: 'trainingJob', id: job.id });
      return response(200).json(job);
    },
  );

  router.post(
    '/v1/training/jobs/{job_id}/merge',
    'mergeTrainingJob',
    async ({ params, request, response }) => {
      const parent = trainingJob(state, params.job_id);
      const body = await optionalJson<RequestBodyOf<'mergeTrainingJob'>>(request);
      const scope = `mergeTrainingJob/${parent.id}` as const;
      const key = idempotencyKeyOf(request, body);
      const earlier = replayed(ctx, scope, key, body);
      if (earlier)
        return response(201).json({ merge_job_id: earlier.id, job: trainingJob(state, earlier.id) });
      if (parent.status !== 'completed' || parent.type !== 'finetune' || parent.method === 'full') {
        throw new MockHttpError(
          409,
          'conflict',
          `Job ${parent.id} has no LoRA adapter to merge (it must be a completed LoRA/QLoRA fine-tune).`,
        );
      }
      const job = createTrainingJob(state, {
        type: 'merge',
        base_model: parent.base_model ?? undefined,
        parent_job_id: parent.id,
        output_name: body?.output_name ?? `${parent.adapter_name ?? parent.id}-merged`,
        max_steps: 1,
      });
      (job.config as Record<string, unknown>).export_gguf = body?.export_gguf ?? false;
      if (body?.quantization_types)
        (job.config as Record<string, unknown>).quantization_types = body.quantization_types;
      remember(ctx, scope, key, body, { kind: 'trainingJob', id: job.id });
      return response(201).json({ merge_job_id: job.id, job });
    },
  );

  router.get('/v1/training/jobs/{job_id}/stream', 'streamTrainingJob', ({ params, request, response }) => {
    const job = trainingJob(state, params.job_id);
    const sent = jobStreamResponse(state, job.id, job, request);
    if (ctx.autoAdvance) tickTrainingJob(state, job, ctx.settings);
    return response.untyped(sent);
  });

  router.get('/v1/training/jobs/{job_id}/logs', 'listTrainingJobLogs', ({ params, request, response }) => {
    trainingJob(state, params.job_id);
    return response(200).json(logPageOf(state, params.job_id, new URL(request.url).searchParams));
  });

  router.get(
    '/v1/training/jobs/{job_id}/metrics',
    'listTrainingJobMetrics',
    ({ params, request, response }) => {
      trainingJob(state, params.job_id);
      return response(200).json(metricPageOf(state, params.job_id, new URL(request.url).searchParams));
    },
  );

  router.get(
    '/v1/training/jobs/{job_id}/events',
    'listTrainingJobEvents',
    ({ params, request, response }) => {
      trainingJob(state, params.job_id);
      const since = intParam(
        new URL(request.url).searchParams.get('since'),
        'since',
        0,
        0,
        Number.MAX_SAFE_INTEGER,
      );
      const events = (state.events.get(params.job_id) ?? []).filter((e) => e.seq > since);
      return response(200).json({ job_id: params.job_id, events });
    },
  );

  router.get('/v1/training/jobs/{job_id}/result', 'getTrainingJobResult', ({ params, response }) => {
    trainingJob(state, params.job_id);
    const result = state.results.get(params.job_id);
    if (!result)
      throw new MockHttpError(404, 'not_found', `Job ${params.job_id} has no result yet.`, 'job_id');
    return response(200).json(result);
  });

  router.get('/v1/training/jobs/{job_id}/output', 'listTrainingJobOutput', ({ params, response }) => {
    const job = trainingJob(state, params.job_id);
    const files = [...(state.outputs.get(job.id)?.values() ?? [])].map((f) => ({
      name: f.name,
      size_bytes: f.bytes.length,
      size_mb: Math.round((f.bytes.length / 1e6) * 100) / 100,
      sha256: f.sha256,
      download_url: `/v1/training/jobs/${job.id}/output/${f.name}`,
      path: `data/jobs/${job.id}/${f.name}`,
    }));
    const totalMb = Math.round(files.reduce((sum, f) => sum + f.size_bytes, 0) / 1e4) / 100;
    return response(200).json({
      job_id: job.id,
      status: job.status,
      files,
      total_files: files.length,
      total_size_mb: totalMb,
    });
  });

  router.get(
    '/v1/training/jobs/{job_id}/output/{file}',
    'downloadTrainingJobOutput',
    ({ params, request, response }) => {
      trainingJob(state, params.job_id);
      const file = state.outputs.get(params.job_id)?.get(params.file);
      if (!file) throw notFound('output file', params.file, 'file');
      return response.untyped(fileResponse(file, request.headers.get('range')));
    },
  );

  router.get(
    '/v1/training/jobs/{job_id}/checkpoints',
    'listTrainingJobCheckpoints',
    ({ params, response }) => {
      trainingJob(state, params.job_id);
      return response(200).json(checkpointListOf(state, params.job_id));
    },
  );
}

/** A request's query, as URLSearchParams or the router's typed view of it. */
type Search = { get(name: string): string | null };

/** A job's log lines after `since`, or the last `tail` (shared by training and distillation jobs). */
export function logPageOf(state: MockState, jobId: string, search: Search): Schemas['LogPage'] {
  const since = intParam(search.get('since'), 'since', 0, 0, Number.MAX_SAFE_INTEGER);
  const tail = search.get('tail') !== null ? intParam(search.get('tail'), 'tail', 1000, 1, 1000) : undefined;
  const all = state.logs.get(jobId) ?? [];
  const lines = all.filter((line) => line.seq > since);
  return {
    job_id: jobId,
    latest_seq: all.at(-1)?.seq ?? 0,
    lines: tail === undefined ? lines.slice(0, 1000) : lines.slice(-tail),
  };
}

/** A job's metric points after `since_step`, up to `limit`. */
export function metricPageOf(state: MockState, jobId: string, search: Search): Schemas['MetricPage'] {
  const sinceStep = intParam(search.get('since_step'), 'since_step', -1, -1, Number.MAX_SAFE_INTEGER);
  const limit = intParam(search.get('limit'), 'limit', 1000, 1, 10000);
  const all = state.metrics.get(jobId) ?? [];
  const points = all.filter((p) => p.step > sinceStep).slice(0, limit);
  const latest = all.reduce((max, p) => Math.max(max, p.step), -1);
  return { job_id: jobId, count: points.length, latest_step: latest, points };
}

export function checkpointListOf(state: MockState, jobId: string): Schemas['CheckpointList'] {
  const checkpoints = (state.checkpoints.get(jobId) ?? []).map(({ fileId: _file, ...c }) => c);
  return { job_id: jobId, checkpoints };
}

/** The checkpoint a failed or cancelled job resumes from (the named one, else the latest), or the server's 409/404. */
export function resumeCheckpoint(
  state: MockState,
  job: { id: string; status: string },
  name: string | undefined,
): { name: string; step: number } {
  if (job.status !== 'failed' && job.status !== 'cancelled') {
    throw new MockHttpError(
      409,
      'job_not_resumable',
      `Job ${job.id} is ${job.status}; only failed or cancelled jobs resume.`,
    );
  }
  const checkpoints = state.checkpoints.get(job.id) ?? [];
  const checkpoint = name ? checkpoints.find((c) => c.name === name) : checkpoints.at(-1);
  if (name && !checkpoint) throw notFound('checkpoint', name, 'checkpoint');
  if (!checkpoint)
    throw new MockHttpError(409, 'job_not_resumable', `Job ${job.id} has no checkpoint to resume from.`);
  return checkpoint;
}

export function trainingJob(state: MockState, id: string): TrainingJob {
  const job = state.trainingJobs.get(id);
  if (!job) throw notFound('job', id, 'job_id', 'job_not_found');
  return job;
}

/** Validates and stores a new job as the server would; also used by merge, benchmark and auto-training. */
export function createTrainingJob(state: MockState, body: RequestBodyOf<'createTrainingJob'>): TrainingJob {
  const template = body.template ? state.templates.get(body.template) : undefined;
  if (body.template && !template) throw notFound('template', body.template, 'template');
  const preset = template?.config ?? {};
  const type = body.type ?? preset.type ?? 'finetune';
  const baseModel = resolveBaseModel(state, body, preset.base_model);
  if (!baseModel) {
    throw new MockHttpError(
      400,
      'invalid_config',
      'Name a base model (base_model, model_name, base_model_id or source_model_id).',
      'base_model',
    );
  }
  let datasetId = body.dataset_id ?? null;
  if (datasetId && !state.datasets.has(datasetId)) throw notFound('dataset', datasetId, 'dataset_id');
  if (body.train_texts) {
    datasetId = storeDataset(state, {
      name: `${body.run_name ?? 'inline'}-texts`,
      records: body.train_texts.map((text) => ({ text })),
      source: 'inline',
    }).id;
  }
  const needsData = type === 'finetune' || type === 'train' || type === 'contract';
  if (needsData && !datasetId && !body.dataset_path) {
    throw new MockHttpError(
      400,
      'invalid_config',
      'Give dataset_id, dataset_path or train_texts.',
      'dataset_id',
    );
  }
  const trainingConfig = {
    ...preset.training_config,
    ...flatTrainingConfig(body),
    ...(body.hyperparams?.lr !== undefined ? { learning_rate: body.hyperparams.lr } : {}),
    ...(body.hyperparams?.steps !== undefined ? { max_steps: body.hyperparams.steps } : {}),
    ...body.training_config,
  };
  const loraRank = body.lora_rank ?? body.hyperparams?.lora_rank;
  const loraConfig = {
    ...preset.lora_config,
    ...(loraRank !== undefined ? { r: loraRank } : {}),
    ...(body.lora_alpha !== undefined ? { lora_alpha: body.lora_alpha } : {}),
    ...body.lora_config,
  };
  const totalSteps = plannedSteps(state, trainingConfig, body.hyperparams, datasetId);
  chargeable(state, totalSteps * COST_PER_STEP);
  const outputName =
    body.output_name ??
    body.hyperparams?.output_name ??
    body.output_dir?.split('/').filter(Boolean).pop() ??
    undefined;
  const at = now();
  const id = newId(state, 'job');
  const method = type === 'finetune' ? (body.method ?? preset.method ?? 'lora') : null;
  const job: TrainingJob = {
    id,
    job_id: id,
    type,
    method,
    status: 'pending',
    phase: 'queued',
    tenant_id: state.tenantId,
    run_name: body.run_name ?? null,
    base_model: baseModel,
    model_name: baseModel,
    dataset_id: datasetId,
    parent_job_id: body.parent_job_id ?? null,
    // The server's shape: the resolved settings the worker runs (see TrainingJobConfig in the spec).
    config: {
      type,
      base_model: { id: null, name: baseModel ?? 'unknown', source: baseModel },
      seed: trainingConfig.seed ?? 42,
      output_name: outputName ?? null,
      ...(body.run_name ? { run_name: body.run_name } : {}),
      ...(method
        ? {
            method,
            lora: {
              r: loraConfig.r,
              alpha: loraConfig.lora_alpha,
              dropout: loraConfig.lora_dropout,
              target_modules: loraConfig.target_modules,
              bias: loraConfig.bias,
            },
            training: { ...trainingConfig, max_steps: totalSteps },
            distributed: { enabled: body.distributed ?? false, num_nodes: body.num_nodes ?? 1 },
          }
        : {}),
    },
    progress: 0,
    current_step: 0,
    total_steps: totalSteps,
    current_loss: null,
    learning_rate: null,
    metrics: {},
    retries: 0,
    attempt: 0,
    last_checkpoint_step: 0,
    output_model_id: null,
    adapter_name: null,
    adapter_path: null,
    cancel_requested: false,
    cost_accrued: 0,
    priority: body.priority ?? 50,
    error: null,
    error_message: null,
    created_at: at,
    updated_at: at,
    started_at: null,
    finished_at: null,
    completed_at: null,
  };
  state.trainingJobs.set(id, job);
  const sourceModelId = body.source_model_id ?? body.hyperparams?.source_model_id;
  if (sourceModelId) state.sourceModelIds.set(id, sourceModelId);
  appendEvent(state, id, 'created', { type });
  appendLog(state, id, `${type} job created on ${baseModel}`);
  return job;
}

function resolveBaseModel(
  state: MockState,
  body: RequestBodyOf<'createTrainingJob'>,
  preset: string | undefined,
) {
  if (body.base_model_id) {
    const entry = state.baseModels.get(body.base_model_id);
    if (!entry) throw notFound('base model', body.base_model_id, 'base_model_id');
    return entry.name;
  }
  const sourceId = body.source_model_id ?? body.hyperparams?.source_model_id;
  if (sourceId) {
    const model = state.models.get(sourceId);
    if (!model) throw notFound('model', sourceId, 'source_model_id');
    if (!body.base_model && !body.model_name) return model.name;
  }
  return body.base_model ?? body.model_name ?? preset ?? null;
}

function flatTrainingConfig(body: RequestBodyOf<'createTrainingJob'>): Partial<Schemas['TrainingConfig']> {
  const flat: Partial<Schemas['TrainingConfig']> = {};
  if (body.num_epochs !== undefined) flat.num_epochs = body.num_epochs;
  if (body.batch_size !== undefined) flat.batch_size = body.batch_size;
  if (body.learning_rate !== undefined) flat.learning_rate = body.learning_rate;
  if (body.max_steps !== undefined) flat.max_steps = body.max_steps;
  if (body.max_seq_length !== undefined) flat.max_seq_length = body.max_seq_length;
  if (body.eval_steps !== undefined) flat.eval_steps = body.eval_steps;
  if (body.use_gradient_checkpointing !== undefined)
    flat.use_gradient_checkpointing = body.use_gradient_checkpointing;
  return flat;
}

function plannedSteps(
  state: MockState,
  config: Partial<Schemas['TrainingConfig']>,
  hyperparams: Partial<Schemas['Hyperparams']> | undefined,
  datasetId: string | null,
): number {
  if (config.max_steps !== undefined && config.max_steps > 0) return config.max_steps;
  if (hyperparams?.cycles && hyperparams.steps_per_cycle)
    return hyperparams.cycles * hyperparams.steps_per_cycle;
  const examples = datasetId ? state.datasets.get(datasetId)?.num_examples : undefined;
  if (examples && config.num_epochs) {
    return Math.max(1, Math.ceil((examples * config.num_epochs) / (config.batch_size ?? 4)));
  }
  return DEFAULT_TOTAL_STEPS;
}
