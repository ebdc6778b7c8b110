// The worker protocol, so that a worker implementation can be contract-tested against the same fake.
import type { components } from '../../generated/api.js';
import { badJson, type MockContext } from '../context.js';
import { MockHttpError, notFound } from '../errors.js';
import { fileResponse, jobFiles, storeFile } from '../files.js';
import {
  advanceDistillationJob,
  appendEvent,
  completeTrainingJob,
  failTrainingJob,
  finishCancel,
} from '../simulate.js';
import { type Lease, type MockState, newId, now } from '../state.js';

type Schemas = components['schemas'];
type AnyJob = Schemas['TrainingJob'] | Schemas['DistillationJob'];

const LEASE_SECONDS = 60;

export function workerHandlers({ router, state }: MockContext) {
  // Inference needs a caller on the OpenAI surface, which the mock does not serve: no request is
  // ever waiting, and a report finds its caller gone.
  router.post('/v1/workers/inference/claim', 'claimInference', async ({ request, response }) => {
    await request.json().catch(badJson);
    return response(204).empty();
  });

  router.post(
    '/v1/workers/inference/{request_id}/report',
    'reportInference',
    async ({ request, response }) => {
      await request.json().catch(badJson);
      return response(200).json({ cancelled: true });
    },
  );

  router.post('/v1/workers/claim', 'claimJob', async ({ request, response }) => {
    const body = await request.json().catch(badJson);
    const found = nextJob(state, body.capabilities);
    if (!found) return response(204).empty();
    const { job, kind, type } = found;
    const lease: Lease = {
      token: newId(state, 'lease'),
      workerId: body.worker_id,
      expiresAt: Date.now() + LEASE_SECONDS * 1000,
    };
    state.leases.set(job.id, lease);
    const at = now();
    job.status = 'running';
    job.started_at ??= at;
    job.updated_at = at;
    const attempt = kind === 'training' ? ((job as Schemas['TrainingJob']).attempt ?? 0) + 1 : 1;
    if (kind === 'training') (job as Schemas['TrainingJob']).attempt = attempt;
    appendEvent(state, job.id, 'claimed', { worker_id: body.worker_id, attempt });
    const checkpoint = (state.checkpoints.get(job.id) ?? []).at(-1);
    const datasetId = kind === 'training' ? (job as Schemas['TrainingJob']).dataset_id : undefined;
    const datasetFileId = datasetId ? state.datasetFiles.get(datasetId) : undefined;
    const datasetFile = datasetFileId ? state.files.get(datasetFileId) : undefined;
    const claimed: Schemas['ClaimedJob'] = {
      job_id: job.id,
      kind,
      type,
      attempt,
      lease_token: lease.token,
      lease_expires_at: new Date(lease.expiresAt).toISOString(),
      lease_seconds: LEASE_SECONDS,
      log_seq: state.logs.get(job.id)?.at(-1)?.seq ?? 0,
      spec: { ...(kind === 'training' ? job.config : state.distillationConfigs.get(job.id)) },
      inputs: datasetFile
        ? [
            {
              role: 'dataset',
              name: datasetFile.name,
              file_id: datasetFile.id,
              download_url: `/v1/workers/files/${datasetFile.id}`,
              size_bytes: datasetFile.bytes.length,
              sha256: datasetFile.sha256,
            },
          ]
        : [],
      resume_from: checkpoint
        ? {
            name: checkpoint.name,
            step: checkpoint.step,
            download_url: `/v1/workers/files/${checkpoint.fileId}`,
          }
        : null,
    };
    return response(200).json({ job: claimed });
  });

  router.post(
    '/v1/workers/jobs/{job_id}/heartbeat',
    'heartbeatJob',
    async ({ params, request, response }) => {
      const body = await request.json().catch(badJson);
      const job = leasedJob(state, params.job_id, body.lease_token);
      const lease = state.leases.get(job.id)!;
      lease.expiresAt = Date.now() + LEASE_SECONDS * 1000;
      if (body.progress) applyProgress(job, body.progress);
      return response(200).json({
        lease_expires_at: new Date(lease.expiresAt).toISOString(),
        cancel_requested: job.cancel_requested ?? false,
      });
    },
  );

  router.post('/v1/workers/jobs/{job_id}/logs', 'reportJobLogs', async ({ params, request, response }) => {
    const body = await request.json().catch(badJson);
    const job = leasedJob(state, params.job_id, body.lease_token);
    const lines = state.logs.get(job.id) ?? [];
    const known = new Set(lines.map((l) => l.seq));
    let accepted = 0;
    for (const line of body.lines) {
      if (known.has(line.seq)) continue;
      lines.push({ seq: line.seq, ts: line.ts ?? now(), stream: line.stream ?? 'stdout', text: line.text });
      known.add(line.seq);
      accepted++;
    }
    lines.sort((a, b) => a.seq - b.seq);
    state.logs.set(job.id, lines);
    return response(200).json({ accepted, cancel_requested: job.cancel_requested ?? false });
  });

  router.post(
    '/v1/workers/jobs/{job_id}/metrics',
    'reportJobMetrics',
    async ({ params, request, response }) => {
      const body = await request.json().catch(badJson);
      const job = leasedJob(state, params.job_id, body.lease_token);
      const points = state.metrics.get(job.id) ?? [];
      const known = new Set(points.map((p) => `${p.phase}:${p.step}`));
      let accepted = 0;
      for (const point of body.points) {
        if (known.has(`${point.phase}:${point.step}`)) continue;
        points.push({ ...point, ts: point.ts ?? now() });
        known.add(`${point.phase}:${point.step}`);
        accepted++;
      }
      points.sort((a, b) => a.step - b.step);
      state.metrics.set(job.id, points);
      return response(200).json({ accepted, cancel_requested: job.cancel_requested ?? false });
    },
  );

  router.post(
    '/v1/workers/jobs/{job_id}/events',
    'reportJobEvents',
    async ({ params, request, response }) => {
      const body = await request.json().catch(badJson);
      const job = leasedJob(state, params.job_id, body.lease_token);
      if (body.phase) {
        (job as { phase: string }).phase = body.phase;
        appendEvent(state, job.id, 'phase', { phase: body.phase });
      }
      if (body.progress) applyProgress(job, body.progress);
      for (const event of body.events ?? []) appendEvent(state, job.id, event.kind, event.payload ?? {});
      job.updated_at = now();
      return response(200).json({
        accepted: (body.events?.length ?? 0) + (body.phase ? 1 : 0),
        cancel_requested: job.cancel_requested ?? false,
      });
    },
  );

  router.put(
    '/v1/workers/jobs/{job_id}/checkpoints/{checkpoint_name}',
    'uploadJobCheckpoint',
    async ({ params, request, response }) => {
      const job = leasedJob(state, params.job_id, request.headers.get('x-lease-token') ?? '');
      const step = Number(new URL(request.url).searchParams.get('step'));
      if (!Number.isInteger(step) || step < 0)
        throw new MockHttpError(400, 'invalid_request', 'step must be an integer ≥ 0.', 'step');
      const bytes = await receiveUpload(state, `${job.id}/checkpoints/${params.checkpoint_name}`, request);
      if (!bytes.complete) return response(202).json({ received_bytes: bytes.received });
      const file = storeFile(state, params.checkpoint_name, bytes.data);
      const list = (state.checkpoints.get(job.id) ?? []).filter((c) => c.name !== params.checkpoint_name);
      list.push({
        name: params.checkpoint_name,
        step,
        size_bytes: file.bytes.length,
        created_at: file.createdAt,
        fileId: file.id,
      });
      state.checkpoints.set(job.id, list);
      if ('last_checkpoint_step' in job) job.last_checkpoint_step = step;
      appendEvent(state, job.id, 'checkpoint', { name: params.checkpoint_name, step });
      return response(201).json({ name: file.name, size_bytes: file.bytes.length, sha256: file.sha256 });
    },
  );

  router.put(
    '/v1/workers/jobs/{job_id}/outputs/{file}',
    'uploadJobOutput',
    async ({ params, request, response }) => {
      const job = leasedJob(state, params.job_id, request.headers.get('x-lease-token') ?? '');
      const bytes = await receiveUpload(state, `${job.id}/outputs/${params.file}`, request);
      if (!bytes.complete) return response(202).json({ received_bytes: bytes.received });
      const file = storeFile(state, params.file, bytes.data);
      jobFiles(state, job.id).set(params.file, file);
      return response(201).json({ name: file.name, size_bytes: file.bytes.length, sha256: file.sha256 });
    },
  );

  router.get(
    '/v1/workers/jobs/{job_id}/checkpoints/{checkpoint_name}/offset',
    'getJobCheckpointUploadOffset',
    ({ params, request, response }) => {
      const job = leasedJob(state, params.job_id, request.headers.get('x-lease-token') ?? '');
      const part = state.uploadParts.get(`${job.id}/checkpoints/${params.checkpoint_name}`);
      return response(200).json({ received_bytes: part?.length ?? 0 });
    },
  );

  router.get(
    '/v1/workers/jobs/{job_id}/outputs/{file}/offset',
    'getJobOutputUploadOffset',
    ({ params, request, response }) => {
      const job = leasedJob(state, params.job_id, request.headers.get('x-lease-token') ?? '');
      const part = state.uploadParts.get(`${job.id}/outputs/${params.file}`);
      return response(200).json({ received_bytes: part?.length ?? 0 });
    },
  );

  router.get('/v1/workers/files/{file_id}', 'downloadWorkerFile', ({ params, request, response }) => {
    const file = state.files.get(params.file_id);
    // Like the server, a file opens only with a live lease (the mock does not check which job reads it).
    const token = request.headers.get('x-lease-token');
    const leased = [...state.leases.values()].some((lease) => lease.token === token);
    if (!file || !leased) throw notFound('file', params.file_id, 'file_id');
    return response.untyped(fileResponse(file, request.headers.get('range')));
  });

  router.post('/v1/workers/jobs/{job_id}/complete', 'completeJob', async ({ params, request, response }) => {
    const body = await request.json().catch(badJson);
    const job = leasedJob(state, params.job_id, body.lease_token);
    if ('job_id' in job) completeTrainingJob(state, job, reportedResult(body.result));
    else advanceDistillationJob(state, job, 'completed');
    return response(200).json({ job_id: job.id, status: job.status });
  });

  router.post('/v1/workers/jobs/complete', 'completeJobs', async ({ request, response }) => {
    const body = await request.json().catch(badJson);
    const results = body.completions.map((c): Schemas['CompletionResult'] => {
      try {
        const job = leasedJob(state, c.job_id, c.lease_token);
        if ('job_id' in job) completeTrainingJob(state, job, reportedResult(c.result));
        else advanceDistillationJob(state, job, 'completed');
        return { job_id: job.id, status: 'completed' };
      } catch (err) {
        // each completion is fenced on its own: a stale lease fails only its item
        if (!(err instanceof MockHttpError)) throw err;
        const code = err.code as Schemas['ErrorCode'];
        return { job_id: c.job_id, error: { code, message: err.message, param: err.param } };
      }
    });
    return response(200).json({ results });
  });

  router.post('/v1/workers/jobs/{job_id}/fail', 'failJob', async ({ params, request, response }) => {
    const body = await request.json().catch(badJson);
    const job = leasedJob(state, params.job_id, body.lease_token);
    state.leases.delete(job.id);
    const isTraining = 'job_id' in job;
    const attempt = isTraining ? (job.attempt ?? 1) : 1;
    const maxAttempts = isTraining ? Number((job.config as { max_attempts?: number }).max_attempts ?? 5) : 5;
    if ((body.retryable ?? true) && attempt < maxAttempts) {
      const runAt = new Date(Date.now() + 2 ** attempt * 1000).toISOString();
      job.status = 'pending';
      job.updated_at = now();
      appendEvent(state, job.id, 'retry', { attempt, code: body.error.code });
      return response(200).json({ job_id: job.id, status: job.status, will_retry: true, run_at: runAt });
    }
    if (isTraining) failTrainingJob(state, job, body.error);
    else {
      job.status = 'failed';
      job.error = body.error;
      job.finished_at = now();
    }
    return response(200).json({ job_id: job.id, status: job.status, will_retry: false, run_at: null });
  });

  router.post('/v1/workers/jobs/{job_id}/release', 'releaseJob', async ({ params, request, response }) => {
    const body = await request.json().catch(badJson);
    const job = leasedJob(state, params.job_id, body.lease_token);
    if (job.cancel_requested) {
      finishCancel(state, job);
      return response(200).json({ job_id: job.id, status: job.status, will_retry: false, run_at: null });
    }
    // Back to the queue at once; a hand-back does not count as a failed attempt.
    state.leases.delete(job.id);
    job.status = 'pending';
    job.updated_at = now();
    appendEvent(state, job.id, 'released', { by: 'worker' });
    return response(200).json({ job_id: job.id, status: job.status, will_retry: true, run_at: now() });
  });

  // The mock runs every job on one worker: it forms no gangs, so no member token is ever valid.
  router.post('/v1/workers/jobs/{job_id}/gang/wait', 'waitGang', ({ params }) =>
    noGangMember(state, params.job_id),
  );
  router.post('/v1/workers/jobs/{job_id}/gang/heartbeat', 'heartbeatGangMember', ({ params }) =>
    noGangMember(state, params.job_id),
  );

  router.post(
    '/v1/workers/jobs/{job_id}/cancelled',
    'acknowledgeCancel',
    async ({ params, request, response }) => {
      const body = await request.json().catch(badJson);
      const job = leasedJob(state, params.job_id, body.lease_token);
      finishCancel(state, job);
      return response(200).json({ job_id: job.id, status: job.status });
    },
  );
}

function nextJob(
  state: MockState,
  capabilities: Schemas['WorkerCapabilities'],
): { job: AnyJob; kind: 'training' | 'distillation'; type: Schemas['ClaimedJob']['type'] } | undefined {
  const candidates: {
    job: AnyJob;
    kind: 'training' | 'distillation';
    type: Schemas['ClaimedJob']['type'];
    priority: number;
  }[] = [];
  for (const job of state.trainingJobs.values()) {
    if (job.status !== 'pending' || !capabilities.job_types.includes(job.type)) continue;
    if (job.method && capabilities.methods && !capabilities.methods.includes(job.method)) continue;
    candidates.push({ job, kind: 'training', type: job.type, priority: job.priority ?? 50 });
  }
  if (capabilities.job_types.includes('distill')) {
    for (const job of state.distillationJobs.values()) {
      if (job.status === 'pending')
        candidates.push({ job, kind: 'distillation', type: 'distill', priority: 50 });
    }
  }
  // Highest priority first, then oldest (Maps keep insertion order; sort is stable).
  candidates.sort((a, b) => b.priority - a.priority);
  return candidates[0];
}

/** The job, when `token` is its current lease; a stale or unknown token is 409 lease_lost (fencing). */
/**
 * A resumable upload as the server takes it: without Content-Range the body is the whole file;
 * with `bytes first-last/total` it must start where the bytes received so far end.
 */
async function receiveUpload(
  state: MockState,
  key: string,
  request: Request,
): Promise<{ complete: true; data: Uint8Array } | { complete: false; received: number }> {
  const body = new Uint8Array(await request.arrayBuffer());
  const header = request.headers.get('content-range');
  if (header === null) {
    state.uploadParts.delete(key);
    return { complete: true, data: body };
  }
  const match = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(header.trim());
  const [first, last, total] = match ? match.slice(1).map(Number) : [];
  if (first === undefined || last === undefined || total === undefined || first > last || last >= total)
    throw new MockHttpError(400, 'invalid_request', 'Malformed Content-Range.', 'Content-Range');
  if (body.length !== last - first + 1)
    throw new MockHttpError(
      400,
      'invalid_request',
      'The body does not match its Content-Range.',
      'Content-Range',
    );
  const have = first === 0 ? new Uint8Array() : (state.uploadParts.get(key) ?? new Uint8Array());
  if (have.length !== first) {
    throw new MockHttpError(
      409,
      'upload_offset_mismatch',
      `The server holds ${have.length} bytes of this file, not ${first}.`,
      'Content-Range',
    );
  }
  const data = new Uint8Array(first + body.length);
  data.set(have);
  data.set(body, first);
  if (data.length < total) {
    state.uploadParts.set(key, data);
    return { complete: false, received: data.length };
  }
  state.uploadParts.delete(key);
  return { complete: true, data };
}

/** What a gang operation answers here: 404 for an unknown job, else 409 lease_lost (no gang, no member). */
function noGangMember(state: MockState, jobId: string): never {
  if (!state.trainingJobs.has(jobId) && !state.distillationJobs.has(jobId)) {
    throw notFound('job', jobId, 'job_id', 'job_not_found');
  }
  throw new MockHttpError(
    409,
    'lease_lost',
    `The mock forms no gangs: no member of ${jobId}.`,
    'member_token',
  );
}

function leasedJob(state: MockState, jobId: string, token: string): AnyJob {
  const job = state.trainingJobs.get(jobId) ?? state.distillationJobs.get(jobId);
  if (!job) throw notFound('job', jobId, 'job_id', 'job_not_found');
  const lease = state.leases.get(jobId);
  if (!lease || lease.token !== token) {
    throw new MockHttpError(409, 'lease_lost', `The lease on ${jobId} is no longer yours.`, 'lease_token');
  }
  return job;
}

function applyProgress(job: AnyJob, progress: Schemas['JobProgress']) {
  if ('job_id' in job) {
    if (progress.current_step !== undefined) job.current_step = progress.current_step;
    if (progress.total_steps !== undefined) job.total_steps = progress.total_steps;
    if (progress.current_loss !== undefined) job.current_loss = progress.current_loss;
    if (progress.learning_rate !== undefined) job.learning_rate = progress.learning_rate;
    if (job.total_steps)
      job.progress = Math.min(100, Math.round((1000 * job.current_step) / job.total_steps) / 10);
  } else {
    Object.assign(job.progress, progress);
  }
}

const NUMERIC_RESULT_KEYS = [
  'ppl_baseline',
  'ppl_final',
  'ppl_delta_pct',
  'loss_final',
  'eval_loss_final',
  'params_before',
  'params_after',
  'params_delta',
  'params_trainable',
  'function_preservation',
  'gpu_seconds',
  'tokens_processed',
  'cost_usd',
] as const;

/** The worker's free-form result, split into the spec's TrainingResult fields and `details`. */
function reportedResult(result: Record<string, unknown>): Partial<Schemas['TrainingResult']> {
  const picked: Partial<Schemas['TrainingResult']> = {};
  const details: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(result)) {
    if (
      (NUMERIC_RESULT_KEYS as readonly string[]).includes(key) &&
      (typeof value === 'number' || value === null)
    ) {
      (picked as Record<string, unknown>)[key] = value;
    } else details[key] = value;
  }
  return { ...picked, details };
}
