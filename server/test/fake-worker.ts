/** A worker that speaks the protocol over HTTP, step by step, for tests. */
import type { TestServer } from './harness.js';

export const ALL_JOB_TYPES = ['finetune', 'train', 'contract', 'merge', 'benchmark', 'distill'];

export interface Capabilities {
  job_types: string[];
  methods?: string[];
  device: 'cpu' | 'cuda' | 'mlx';
}

export interface ClaimedJob {
  job_id: string;
  kind: string;
  type: string;
  attempt: number;
  lease_token: string;
  lease_expires_at: string;
  lease_seconds: number;
  log_seq: number;
  spec: Record<string, unknown>;
  inputs: {
    role: string;
    name: string;
    file_id: string;
    download_url: string;
    size_bytes: number;
    sha256: string;
  }[];
  resume_from: { name: string; step: number; download_url: string } | null;
}

export function fakeWorker(server: TestServer, workerId = 'worker-1') {
  const post = (path: string, json: unknown) =>
    server.api(path, { key: server.workerToken, method: 'POST', json });
  const jobPath = (jobId: string, action: string) => `/v1/workers/jobs/${jobId}/${action}`;

  return {
    async claim(
      capabilities: Capabilities = { job_types: ALL_JOB_TYPES, device: 'cpu' },
      waitSeconds = 0,
    ): Promise<ClaimedJob | null> {
      const res = await post('/v1/workers/claim', {
        worker_id: workerId,
        capabilities,
        wait_seconds: waitSeconds,
      });
      if (res.status === 204) return null;
      if (res.status !== 200) throw new Error(`claim answered ${res.status}: ${await res.text()}`);
      return ((await res.json()) as { job: ClaimedJob }).job;
    },
    heartbeat: (jobId: string, token: string, progress?: Record<string, unknown>) =>
      post(jobPath(jobId, 'heartbeat'), { lease_token: token, ...(progress ? { progress } : {}) }),
    logs: (
      jobId: string,
      token: string,
      lines: { seq: number; text: string; stream?: string; ts?: string }[],
    ) => post(jobPath(jobId, 'logs'), { lease_token: token, lines }),
    metrics: (jobId: string, token: string, points: Record<string, unknown>[]) =>
      post(jobPath(jobId, 'metrics'), { lease_token: token, points }),
    events: (jobId: string, token: string, report: Record<string, unknown>) =>
      post(jobPath(jobId, 'events'), { lease_token: token, ...report }),
    complete: (jobId: string, token: string, result: Record<string, unknown> = {}) =>
      post(jobPath(jobId, 'complete'), { lease_token: token, result }),
    fail: (
      jobId: string,
      token: string,
      error = { code: 'training_error', message: 'boom' },
      retryable = true,
    ) => post(jobPath(jobId, 'fail'), { lease_token: token, error, retryable }),
    cancelled: (jobId: string, token: string) => post(jobPath(jobId, 'cancelled'), { lease_token: token }),
    upload(
      jobId: string,
      token: string,
      kind: 'outputs' | 'checkpoints',
      name: string,
      body: Buffer,
      step?: number,
    ) {
      const query = step === undefined ? '' : `?step=${step}`;
      return server.api(`/v1/workers/jobs/${jobId}/${kind}/${name}${query}`, {
        key: server.workerToken,
        method: 'PUT',
        body: new Uint8Array(body),
        headers: { 'content-type': 'application/octet-stream', 'x-lease-token': token },
      });
    },
    /** Downloads are opened by the lease of a job that reads the file. */
    download: (url: string, token: string, range?: string) =>
      server.api(url, {
        key: server.workerToken,
        headers: { 'x-lease-token': token, ...(range ? { range } : {}) },
      }),
  };
}

/** Creates a small LoRA fine-tune from inline texts as the default tenant; returns its id. */
export async function createFinetune(
  server: TestServer,
  extra: Record<string, unknown> = {},
): Promise<string> {
  const res = await server.api('/v1/training/jobs', {
    method: 'POST',
    json: {
      base_model: 'smollm2-135m-instruct',
      train_texts: ['hello world', 'good night'],
      max_steps: 10,
      ...extra,
    },
  });
  if (res.status !== 201) throw new Error(`create answered ${res.status}: ${await res.text()}`);
  return ((await res.json()) as { id: string }).id;
}

export const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * A serving worker for tests: claims inference requests in the background and answers each at once
 * (`load`/`unload` with done, text requests with `reply`), recording what it was asked.
 */
export function fakeServingWorker(server: TestServer, workerId = 'serving-1', reply = 'ok') {
  const asked: { kind: string; target: { name: string } }[] = [];
  let running = true;
  const post = (path: string, json: unknown) =>
    server.api(path, { key: server.workerToken, method: 'POST', json });
  const claimOnce = async () => {
    const res = await post('/v1/workers/inference/claim', { worker_id: workerId, wait_seconds: 0.2 });
    if (res.status === 204) return;
    const request = (await res.json()) as {
      request_id: string;
      request_token: string;
      input: { kind: string };
      target: { name: string };
    };
    asked.push({ kind: request.input.kind, target: request.target });
    const text = ['load', 'unload'].includes(request.input.kind) ? '' : reply;
    await post(`/v1/workers/inference/${request.request_id}/report`, {
      request_token: request.request_token,
      worker_id: workerId,
      text,
      done: true,
      finish_reason: 'stop',
      usage: { prompt_tokens: 1, completion_tokens: text ? 1 : 0 },
    });
  };
  const loop = (async () => {
    while (running) await claimOnce();
  })();
  return {
    workerId,
    asked,
    /** Resolves once the worker has announced itself (its first claim answered). */
    ready: () => claimOnce(),
    async stop() {
      running = false;
      await loop;
    },
  };
}
