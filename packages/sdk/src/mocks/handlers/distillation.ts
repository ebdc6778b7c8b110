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
  COST_PER_TEACHER_SAMPLE,
  chargeable,
  distillationArtifacts,
  requestCancel,
  tickDistillationJob,
} from '../simulate.js';
import { type MockState, newId, now } from '../state.js';
import { jobStreamResponse } from '../stream.js';
import { checkpointListOf, logPageOf, metricPageOf, resumeCheckpoint } from './training.js';

type Schemas = components['schemas'];

export function distillationHandlers(ctx: MockContext) {
  const { router, state } = ctx;

  router.post('/v1/distillation', 'createDistillationJob', async ({ request, response }) => {
    const body = await request.json().catch(badJson);
    const key = idempotencyKeyOf(request, body);
    const earlier = replayed(ctx, 'createDistillationJob', key, body);
    if (earlier) return response(201).json(distillationJob(state, earlier.id));
    checkTenant(state, body.tenant_id);
    const config = body.config;
    if (!config.dataset_id && !config.prompts?.length) {
      throw new MockHttpError(
        400,
        'invalid_config',
        'Give config.dataset_id or config.prompts.',
        'config.prompts',
      );
    }
    if (config.dataset_id && !state.datasets.has(config.dataset_id)) {
      throw new MockHttpError(400, 'invalid_config', `No dataset ${config.dataset_id}.`, 'config.dataset_id');
    }
    const promptsTotal = config.prompts?.length ?? config.num_prompts ?? 500;
    const trainingSteps = config.training_steps ?? 100;
    chargeable(
      state,
      promptsTotal * (config.n_samples ?? 4) * COST_PER_TEACHER_SAMPLE + trainingSteps * COST_PER_STEP,
    );
    const at = now();
    const id = newId(state, 'job');
    const { teacher_api_key: _secret, ...visibleConfig } = config;
    const job: Schemas['DistillationJob'] = {
      id,
      name: body.name ?? `distill-${id.slice(-6)}`,
      description: body.description ?? null,
      tenant_id: state.tenantId,
      status: 'pending',
      phase: 'initializing',
      config: Object.assign(
        {
          num_prompts: 500,
          n_samples: 4,
          training_steps: 100,
          bond_beta: 0.5,
          bond_gamma: 0.1,
          temperature: 0.8,
          max_new_tokens: 128,
          learning_rate: 0.0002,
          lora_rank: 16,
          export_gguf: false,
        },
        visibleConfig,
      ),
      progress: {
        prompts_done: 0,
        prompts_total: promptsTotal,
        training_step: 0,
        total_steps: trainingSteps,
      },
      results: {},
      cost_accrued: 0,
      cancel_requested: false,
      retries: 0,
      error: null,
      created_at: at,
      updated_at: at,
      started_at: null,
      finished_at: null,
    };
    state.distillationJobs.set(id, job);
    state.distillationConfigs.set(id, structuredClone(config));
    appendEvent(state, id, 'created');
    appendLog(state, id, `distillation job created: ${config.teacher_model} → ${config.student_model}`);
    remember(ctx, 'createDistillationJob', key, body, { kind: 'distillationJob', id });
    return response(201).json(job);
  });

  router.get('/v1/distillation', 'listDistillationJobs', ({ request, query, response }) => {
    checkTenant(state, query.get('tenant_id') ?? undefined);
    const status = query.get('status');
    const jobs = newestFirst(state.distillationJobs.values()).filter((j) => !status || j.status === status);
    const { page, ...paging } = pageOf(jobs, request.url);
    return response(200).json({ jobs: page, ...paging });
  });

  router.get('/v1/distillation/{job_id}', 'getDistillationJob', ({ params, query, response }) => {
    checkTenant(state, query.get('tenant_id') ?? undefined);
    const job = distillationJob(state, params.job_id);
    // The caller sees the job as it is; the work happens between this poll and the next.
    const seen = structuredClone(job);
    if (ctx.autoAdvance) tickDistillationJob(state, job);
    return response(200).json(seen);
  });

  router.post('/v1/distillation/{job_id}/cancel', 'cancelDistillationJob', ({ params, query, response }) => {
    checkTenant(state, query.get('tenant_id') ?? undefined);
    const job = distillationJob(state, params.job_id);
    requestCancel(state, job);
    return response(200).json(job);
  });

  router.get(
    '/v1/distillation/{job_id}/events',
    'listDistillationJobEvents',
    ({ params, query, response }) => {
      checkTenant(state, query.get('tenant_id') ?? undefined);
      distillationJob(state, params.job_id);
      const since = intParam(query.get('since'), 'since', 0, 0, Number.MAX_SAFE_INTEGER);
      const events = (state.events.get(params.job_id) ?? []).filter((e) => e.seq > since);
      return response(200).json({ job_id: params.job_id, events });
    },
  );

  router.get(
    '/v1/distillation/{job_id}/stream',
    'streamDistillationJob',
    ({ params, query, request, response }) => {
      checkTenant(state, query.get('tenant_id') ?? undefined);
      const job = distillationJob(state, params.job_id);
      const sent = jobStreamResponse(state, job.id, job, request);
      if (ctx.autoAdvance) tickDistillationJob(state, job);
      return response.untyped(sent);
    },
  );

  router.get('/v1/distillation/{job_id}/logs', 'listDistillationJobLogs', ({ params, query, response }) => {
    checkTenant(state, query.get('tenant_id') ?? undefined);
    distillationJob(state, params.job_id);
    return response(200).json(logPageOf(state, params.job_id, query));
  });

  router.get(
    '/v1/distillation/{job_id}/metrics',
    'listDistillationJobMetrics',
    ({ params, query, response }) => {
      checkTenant(state, query.get('tenant_id') ?? undefined);
      distillationJob(state, params.job_id);
      return response(200).json(metricPageOf(state, params.job_id, query));
    },
  );

  router.get(
    '/v1/distillation/{job_id}/checkpoints',
    'listDistillationJobCheckpoints',
    ({ params, query, response }) => {
      checkTenant(state, query.get('tenant_id') ?? undefined);
      distillationJob(state, params.job_id);
      return response(200).json(checkpointListOf(state, params.job_id));
    },
  );

  router.post(
    '/v1/distillation/{job_id}/resume',
    'resumeDistillationJob',
    async ({ params, query, request, response }) => {
      checkTenant(state, query.get('tenant_id') ?? undefined);
      const job = distillationJob(state, params.job_id);
      const body = await optionalJson<Schemas['DistillationResumeRequest']>(request);
      const scope = `resumeDistillationJob/${job.id}` as const;
      const key = idempotencyKeyOf(request, body);
      if (replayed(ctx, scope, key, body)) return response(200).json(job);
      const checkpoint = resumeCheckpoint(state, job, body?.checkpoint);
      Object.assign(job, {
        status: 'pending',
        phase: 'initializing',
        error: null,
        finished_at: null,
        cancel_requested: false,
        updated_at: now(),
      } satisfies Partial<Schemas['DistillationJob']>);
      appendEvent(state, job.id, 'resumed', { checkpoint: checkpoint.name, step: checkpoint.step });
      remember(ctx, scope, key, body, { kind: 'distillationJob', id: job.id });
      return response(200).json(job);
    },
  );

  router.get(
    '/v1/distillation/{job_id}/artifacts',
    'getDistillationArtifacts',
    ({ params, query, response }) => {
      checkTenant(state, query.get('tenant_id') ?? undefined);
      return response(200).json(distillationArtifacts(state, distillationJob(state, params.job_id)));
    },
  );

  router.get(
    '/v1/distillation/{job_id}/artifacts/{file}',
    'downloadDistillationArtifact',
    ({ params, request, response }) => {
      distillationJob(state, params.job_id);
      const file = state.outputs.get(params.job_id)?.get(params.file);
      if (!file) throw notFound('artifact', params.file, 'file');
      return response.untyped(fileResponse(file, request.headers.get('range')));
    },
  );
}

function distillationJob(state: MockState, id: string): Schemas['DistillationJob'] {
  const job = state.distillationJobs.get(id);
  if (!job) throw notFound('job', id, 'job_id', 'job_not_found');
  return job;
}

function checkTenant(state: MockState, tenantId: string | undefined) {
  if (tenantId !== undefined && tenantId !== state.tenantId) {
    throw new MockHttpError(
      403,
      'permission_denied',
      "tenant_id does not match your API key's tenant.",
      'tenant_id',
    );
  }
}
