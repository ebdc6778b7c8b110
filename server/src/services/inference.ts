/**
 * Inference served by workers. A caller's request becomes one row of `inference_requests` (deleted
 * when it ends: nothing grows per request, no per-token rows); a worker that announces `serve`
 * long-polls for it, generates, and reports text chunks as they come. The chunks reach the server
 * process holding the caller's connection through Postgres NOTIFY (every process LISTENs), or an
 * in-process event on PGlite, so workers only ever dial out, as they do for training.
 */
import type { AppContext } from '../context.js';
import { ApiError, knownErrorCode, notFound } from '../errors.js';
import { newId, newSecret } from '../ids.js';
import { type PreparedStatement, runPrepared } from '../prepared.js';
import { listen, waitForSignal } from '../queue/notify.js';
import { SeenWorkers } from '../queue/seen-workers.js';
import { resolveBaseModel } from './catalog.js';
import { loadableOutputs } from './job-spec.js';

const CHANNEL = 'tunery_inference';
/** A worker that claimed or reported within this long is taken to be serving. */
export const SERVING_WORKER_SEEN_SECONDS = 60;
/** How long a request may wait for a worker to start answering. */
const FIRST_CHUNK_TIMEOUT_MS = 60_000;
/** How long a started answer may go without a chunk. */
const NEXT_CHUNK_TIMEOUT_MS = 120_000;

export interface InferenceFile {
  file_id: string;
  name: string;
  size_bytes: number;
  sha256: string;
}

/** What a worker loads: a base model (by source), and optionally a LoRA adapter's or a full model's files. */
export interface InferenceTarget {
  /** The name the caller used. */
  name: string;
  base_source: string | null;
  adapter: { key: string; files: InferenceFile[] } | null;
  model_files: { key: string; files: InferenceFile[] } | null;
}

export type InferenceInput =
  | { kind: 'chat'; messages: { role: string; content: string }[] }
  | { kind: 'completion'; prompt: string }
  /** Load the target and keep it in memory; unload it (an adapter) from the worker's memory. */
  | { kind: 'load' }
  | { kind: 'unload' };

export interface InferenceParams {
  max_tokens: number;
  temperature: number;
  top_p: number;
  stop: string[];
  seed: number | null;
}

/** One report of a worker, as the caller's process receives it. */
export interface InferenceChunk {
  text?: string | undefined;
  done?: boolean | undefined;
  finish_reason?: 'stop' | 'length' | undefined;
  usage?: { prompt_tokens: number; completion_tokens: number } | undefined;
  error?: { code: string; message: string } | undefined;
  /** The worker that reported it (filled in by the server). */
  worker_id?: string | undefined;
}

/** The files a worker downloads to load a job's output (GGUF exports are for other runtimes). */
async function outputFiles(ctx: AppContext, jobId: string): Promise<InferenceFile[]> {
  return (await loadableOutputs(ctx, jobId)).map((f) => ({
    file_id: f.id,
    name: f.name,
    size_bytes: Number(f.size_bytes),
    sha256: f.sha256,
  }));
}

/**
 * What `model` names, for this tenant: one of its output models (`model_…`: an adapter over its
 * base, or full weights), one of its adapters by name, a base model of the catalog, or `default`:
 * the model the tenant activated.
 */
export async function resolveInferenceTarget(
  ctx: AppContext,
  tenantId: string,
  model: string,
): Promise<InferenceTarget> {
  if (model === 'default') {
    // The tenant's activated model (POST /v1/models/{id}/activate).
    const tenant = await ctx.knex('tenants').where({ id: tenantId }).first('active_model_id');
    if (!tenant?.active_model_id) {
      throw notFound('model', 'default', 'model', 'model_not_found');
    }
    return { ...(await resolveInferenceTarget(ctx, tenantId, tenant.active_model_id)), name: model };
  }
  const missing = notFound('model', model, 'model', 'model_not_found');
  const output = await ctx.knex('models').where({ id: model, tenant_id: tenantId }).first();
  const adapter = output
    ? null
    : await ctx.knex('adapters').where({ name: model, tenant_id: tenantId }).first();
  if (output?.kind === 'adapter' || output?.kind === 'distilled' || adapter) {
    const jobId = (output ?? adapter).job_id as string | null;
    const baseName = (output?.base_model ?? adapter?.model_name) as string;
    if (!jobId) throw missing;
    const base = await resolveBaseModel(ctx, tenantId, { base_model: baseName }).catch(() => {
      throw missing;
    });
    const files = (await outputFiles(ctx, jobId)).filter((f) => f.name.startsWith('adapter_'));
    if (files.length === 0) throw missing;
    return { name: model, base_source: base.source, adapter: { key: jobId, files }, model_files: null };
  }
  if (output) {
    const files = await outputFiles(ctx, output.job_id);
    if (files.length === 0) throw missing;
    return { name: model, base_source: null, adapter: null, model_files: { key: output.job_id, files } };
  }
  const base = await resolveBaseModel(ctx, tenantId, { base_model: model }).catch(() => {
    throw missing;
  });
  return { name: model, base_source: base.source, adapter: null, model_files: null };
}

// ---------------------------------------------------------------- the caller's side

/**
 * Queues a request (`$1`…`$5`: id, tenant, token, payload, the one worker that may take it) only
 * while a worker serves (one claimed or reported within `$6` seconds), and on Postgres signals the
 * serving workers (`$7`; `$8`, `$9`: channel and message) in the same statement: one round trip
 * before the request waits. No row back: nobody serves.
 */
const ENQUEUE_INFERENCE: PreparedStatement = {
  name: 'tunery_inference_enqueue',
  text: `
    WITH queued AS (
      INSERT INTO inference_requests (id, tenant_id, token, payload, for_worker)
      SELECT $1, $2, $3, $4::jsonb, $5
      WHERE EXISTS (SELECT 1 FROM serving_workers WHERE last_seen_at > now() - make_interval(secs => $6))
      RETURNING id
    )
    SELECT id, CASE WHEN $7::boolean THEN pg_notify($8, $9) END AS signalled FROM queued`,
};

/** The serving workers that claimed or reported within SERVING_WORKER_SEEN_SECONDS. */
const servingWorkersSeen = (ctx: Pick<AppContext, 'knex'>) =>
  ctx
    .knex('serving_workers')
    .where(
      'last_seen_at',
      '>',
      ctx.knex.raw(`now() - make_interval(secs => ?)`, [SERVING_WORKER_SEEN_SECONDS]),
    );

/**
 * Queues one request and yields the worker's chunks until the last (`done`). Leaving early (the
 * caller disconnected: `return()` on the generator) removes the request, which tells the worker
 * to stop at its next report.
 */
export async function* runInference(
  ctx: AppContext,
  tenantId: string,
  target: InferenceTarget,
  input: InferenceInput,
  params: InferenceParams,
  /** Only this worker may take the request. */
  forWorker: string | null = null,
): AsyncGenerator<InferenceChunk, void, undefined> {
  const id = newId('inf');
  const inbox = subscribe(ctx, id);
  // Whether the request is surely not queued (no worker serves), so there is no row to remove.
  let notQueued = false;
  try {
    const rows = await runPrepared(ctx.knex, ENQUEUE_INFERENCE, [
      id,
      tenantId,
      newSecret('infreq'),
      JSON.stringify({ target, input, params }),
      forWorker,
      SERVING_WORKER_SEEN_SECONDS,
      ctx.dbKind === 'postgres',
      CHANNEL,
      JSON.stringify({ queued: true } satisfies Relayed),
    ]);
    notQueued = rows.length === 0;
    if (notQueued) {
      throw new ApiError(
        503,
        'no_serving_worker',
        'No worker serves models: start one with `tunery-worker run --serve`.',
      );
    }
    if (ctx.dbKind !== 'postgres') deliver(ctx, { queued: true });
    let started = false;
    for (;;) {
      const chunk = await inbox.next(started ? NEXT_CHUNK_TIMEOUT_MS : FIRST_CHUNK_TIMEOUT_MS);
      if (!chunk) {
        if (!started)
          throw new ApiError(503, 'inference_timeout', 'No serving worker took the request in time.');
        yield { done: true, error: { code: 'inference_timeout', message: 'The worker stopped answering.' } };
        return;
      }
      started = true;
      yield chunk;
      if (chunk.done) return;
    }
  } finally {
    inbox.close();
    if (!notQueued) await ctx.knex('inference_requests').where('id', id).delete();
  }
}

/** The chunks relayed for request `id`, in order; `next` resolves undefined after `ms` without one. */
function subscribe(ctx: AppContext, id: string) {
  const queue: InferenceChunk[] = [];
  let wake: (() => void) | undefined;
  const event = `inference:${id}`;
  const onChunk = (chunk: InferenceChunk) => {
    queue.push(chunk);
    wake?.();
  };
  ctx.queueSignal.on(event, onChunk);
  return {
    async next(ms: number): Promise<InferenceChunk | undefined> {
      if (queue.length === 0) {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, ms);
          wake = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        wake = undefined;
      }
      return queue.shift();
    },
    close: () => ctx.queueSignal.off(event, onChunk),
  };
}

// ---------------------------------------------------------------- the worker's side

export interface ClaimedInference {
  request_id: string;
  request_token: string;
  target: InferenceTarget;
  input: InferenceInput;
  params: InferenceParams;
}

/** Serving workers recorded by this process (a busy worker's claims and reports write at most every few seconds). */
const servingSeen = new SeenWorkers();

/** Records a serving worker as seen now, with its backend when it said (claims do; reports do not). */
async function markServing(ctx: AppContext, workerId: string, backend: string | null = null): Promise<void> {
  if (!servingSeen.due(ctx.knex, workerId, backend)) return;
  await ctx.knex.raw(
    `INSERT INTO serving_workers (worker_id, last_seen_at, backend) VALUES (?, now(), ?)
     ON CONFLICT (worker_id) DO UPDATE
       SET last_seen_at = now(), backend = COALESCE(EXCLUDED.backend, serving_workers.backend)`,
    [workerId, backend],
  );
  servingSeen.recorded(ctx.knex, workerId, backend);
}

/** The serving workers seen within the last minute, for the status page. */
export async function servingWorkersOnline(
  ctx: Pick<AppContext, 'knex'>,
): Promise<{ worker_id: string; backend: string | null; last_seen_at: Date }[]> {
  return servingWorkersSeen(ctx).orderBy('worker_id').select('worker_id', 'backend', 'last_seen_at');
}

/** The oldest queued request, for worker `workerId`, waiting up to `waitSeconds` for one. */
export async function claimInference(
  ctx: AppContext,
  workerId: string,
  waitSeconds: number,
  backend: string | null = null,
): Promise<ClaimedInference | null> {
  const deadline = Date.now() + waitSeconds * 1000;
  for (;;) {
    await markServing(ctx, workerId, backend);
    const result = await ctx.knex.raw(
      `UPDATE inference_requests SET status = 'claimed', worker_id = ?, claimed_at = now()
       WHERE id = (SELECT id FROM inference_requests
                   WHERE status = 'queued' AND (for_worker IS NULL OR for_worker = ?)
                   ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
       RETURNING id, token, payload`,
      [workerId, workerId],
    );
    const row = result.rows[0];
    if (row) {
      const payload = typeof row.payload === 'string' ? JSON.parse(row.payload) : row.payload;
      return { request_id: row.id, request_token: row.token, ...payload };
    }
    const left = deadline - Date.now();
    if (left <= 0 || ctx.shuttingDown.signal.aborted) return null;
    await waitForSignal(ctx, 'inference-queued', Math.min(left, 5000));
  }
}

/**
 * Relays a worker's report to the caller. Answers whether the caller is gone (the request was
 * removed), so the worker stops generating; a token that is not the request's is `409 lease_lost`.
 */
export async function reportInference(
  ctx: AppContext,
  workerId: string,
  requestId: string,
  token: string,
  chunk: InferenceChunk,
): Promise<{ cancelled: boolean }> {
  await markServing(ctx, workerId);
  // Long text goes in several notifications; the last carries the rest of the report.
  const pieces = (chunk.text ?? '').match(/[\s\S]{1,2000}/gu) ?? [''];
  const messages: Relayed[] = [
    ...pieces.slice(0, -1).map((text) => ({ id: requestId, chunk: { text } })),
    { id: requestId, chunk: { ...chunk, text: pieces.at(-1), worker_id: workerId } },
  ];
  const requestToken = await relayIfToken(ctx, requestId, token, messages[0]!);
  if (requestToken === undefined) return { cancelled: true };
  if (requestToken !== token) {
    throw new ApiError(409, 'lease_lost', 'This request token is not the request’s.', 'request_token');
  }
  for (const message of messages.slice(1)) await notify(ctx, message);
  return { cancelled: false };
}

/** Request `$1`'s token; when it is `$2`, on Postgres (`$3`), `$5` is signalled on channel `$4` too. */
const RELAY_IF_TOKEN: PreparedStatement = {
  name: 'tunery_inference_relay',
  text: `SELECT token, CASE WHEN $3::boolean AND token = $2 THEN pg_notify($4, $5) END AS relayed
         FROM inference_requests WHERE id = $1`,
};

/**
 * Relays `message` when `token` is request `requestId`'s, in the statement that reads it (Postgres:
 * one round trip for a report); answers the request's token, undefined when the request is gone.
 */
async function relayIfToken(
  ctx: AppContext,
  requestId: string,
  token: string,
  message: Relayed,
): Promise<string | undefined> {
  const postgres = ctx.dbKind === 'postgres';
  const [row] = await runPrepared<{ token: string }>(ctx.knex, RELAY_IF_TOKEN, [
    requestId,
    token,
    postgres,
    CHANNEL,
    JSON.stringify(message),
  ]);
  if (row?.token === token && !postgres) deliver(ctx, message);
  return row?.token;
}

/** Whether the worker holding `token` may download file `fileId` (one of its request's model files). */
export async function inferenceRequestReads(
  ctx: AppContext,
  token: string,
  fileId: string,
): Promise<boolean> {
  if (!token.startsWith('infreq_')) return false;
  const row = await ctx.knex('inference_requests').where({ token, status: 'claimed' }).first('payload');
  if (!row) return false;
  const payload = typeof row.payload === 'string' ? JSON.parse(row.payload) : row.payload;
  const target = payload.target as InferenceTarget;
  const files = [...(target.adapter?.files ?? []), ...(target.model_files?.files ?? [])];
  return files.some((f) => f.file_id === fileId);
}

// ---------------------------------------------------------------- the relay

type Relayed = { queued: true } | { id: string; chunk: InferenceChunk };

async function notify(ctx: AppContext, message: Relayed): Promise<void> {
  if (ctx.dbKind === 'postgres')
    await ctx.knex.raw('SELECT pg_notify(?, ?)', [CHANNEL, JSON.stringify(message)]);
  else deliver(ctx, message);
}

function deliver(ctx: AppContext, message: Relayed): void {
  if ('queued' in message) ctx.queueSignal.emit('inference-queued');
  else ctx.queueSignal.emit(`inference:${message.id}`, message.chunk);
}

/** Starts this process's LISTEN for relayed chunks (Postgres only); returns a function that closes it. */
export function listenForInference(ctx: AppContext): Promise<() => Promise<void>> {
  return listen(ctx, CHANNEL, 'inference relay', (payload) => {
    try {
      deliver(ctx, JSON.parse(payload || '{}') as Relayed);
    } catch (err) {
      ctx.logger.warn({ err }, 'unreadable inference relay message');
    }
  });
}

/** Sends one `load`/`unload` request and waits for its end: the worker that did it, or the error. */
export async function runModelAction(
  ctx: AppContext,
  tenantId: string,
  target: InferenceTarget,
  kind: 'load' | 'unload',
  forWorker: string | null = null,
): Promise<{ worker_id: string }> {
  const params = { max_tokens: 1, temperature: 0, top_p: 1, stop: [], seed: null };
  for await (const chunk of runInference(ctx, tenantId, target, { kind }, params, forWorker)) {
    if (chunk.error)
      throw new ApiError(
        502,
        knownErrorCode(chunk.error.code, 'inference_error'),
        chunk.error.message,
        'adapter_name',
      );
    if (chunk.done) return { worker_id: chunk.worker_id ?? '' };
  }
  throw new ApiError(502, 'inference_timeout', 'The worker stopped answering.');
}

/** Serving workers seen within the last minute, of those given. */
export async function liveServingWorkers(ctx: AppContext, workerIds: string[]): Promise<Set<string>> {
  if (workerIds.length === 0) return new Set();
  const rows = await servingWorkersSeen(ctx).whereIn('worker_id', workerIds).pluck('worker_id');
  return new Set(rows as string[]);
}
