import type { Middleware } from 'openapi-fetch';
import type { APIPromise } from '../core/api-promise.js';
import type { ClientOptions, RequestOptions, TuneryClient } from '../core/client.js';
import type { ItemsPromise, PagePromise } from '../core/pagination.js';
import { type WaitOptions, waitForJob } from '../core/polling.js';
import { APIResource, clientFrom } from '../core/resource.js';
import {
  followJobStream,
  type JobStreamMessage,
  type JobStreamOptions,
  streamQuery,
} from '../core/stream.js';
import { allOf, logLines, metricPoints, timelineEvents } from '../core/timeline.js';
import type {
  Checkpoint,
  CheckpointList,
  DistillationArtifacts,
  DistillationEventListParams,
  DistillationJob,
  DistillationJobCreateParams,
  DistillationJobList,
  DistillationJobListParams,
  DistillationLogListParams,
  DistillationMetricListParams,
  DistillationResumeParams,
  EventList,
  JobEvent,
  LogLine,
  LogPage,
  MetricPage,
  MetricPoint,
} from '../types.js';
import { type DownloadOptions, downloadToPath, withRange } from './downloads.js';

/**
 * Distillation jobs (`/v1/distillation`): a teacher's best-of-N samples, curated, distilled into a
 * student with BOND. Use it from a `Tunery` client (`tunery.distillation`) or on its own:
 * `new Distiller({ apiKey, baseURL })`.
 */
export class Distiller extends APIResource {
  constructor(clientOrOptions?: TuneryClient | ClientOptions) {
    super(clientFrom(clientOrOptions));
  }

  /** Registers openapi-fetch middleware on this Distiller's client. */
  use(...middleware: Middleware[]): void {
    this._client.use(...middleware);
  }

  /** Creates a job; it starts `pending`. Retries reuse one Idempotency-Key. */
  create(body: DistillationJobCreateParams, options?: RequestOptions): APIPromise<DistillationJob> {
    return this._client.post('/v1/distillation', { body, ...options });
  }

  retrieve(jobId: string, options?: RequestOptions): APIPromise<DistillationJob> {
    return this._client.get('/v1/distillation/{job_id}', { pathParams: { job_id: jobId }, ...options });
  }

  /** Newest first. `await` for one page, or `for await` for every job. */
  list(
    query?: DistillationJobListParams,
    options?: RequestOptions,
  ): PagePromise<'jobs', DistillationJob, DistillationJobList> {
    return this._client.getList('/v1/distillation', 'jobs', { query, ...options });
  }

  /** Cancels at any phase; partial artifacts are kept. A terminal job is a ConflictError. */
  cancel(jobId: string, options?: RequestOptions): APIPromise<DistillationJob> {
    return this._client.post('/v1/distillation/{job_id}/cancel', {
      pathParams: { job_id: jobId },
      ...options,
    });
  }

  /**
   * The job's timeline: created, claimed, one `phase` event per phase entered, completed… A phase
   * that passed between two polls of `retrieve` is still here.
   */
  events(
    jobId: string,
    query: DistillationEventListParams = {},
    options?: RequestOptions,
  ): ItemsPromise<EventList, JobEvent> {
    return timelineEvents(
      (q) =>
        this._client.get('/v1/distillation/{job_id}/events', {
          pathParams: { job_id: jobId },
          query: q,
          ...options,
        }),
      query,
    );
  }

  /**
   * The job live, from one server-sent-events connection: log lines, metric points, timeline events
   * and status changes (phases included) as they are recorded, each once, ending with an `end`
   * message after the job has finished. Reconnects on its own after the last message received.
   */
  stream(jobId: string, options?: JobStreamOptions): AsyncGenerator<JobStreamMessage, void, undefined> {
    return followJobStream(
      (lastEventId, signal) =>
        this._client.getStream('/v1/distillation/{job_id}/stream', {
          pathParams: { job_id: jobId },
          query: streamQuery(options),
          headers: lastEventId === undefined ? undefined : { 'Last-Event-ID': lastEventId },
          signal,
        }),
      options,
    );
  }

  /** The worker's log lines after `since` (a seq), or the last `tail`; at most 1000 per read. `for await` walks them all. */
  logs(
    jobId: string,
    query: DistillationLogListParams = {},
    options?: RequestOptions,
  ): ItemsPromise<LogPage, LogLine> {
    return logLines(
      (q) =>
        this._client.get('/v1/distillation/{job_id}/logs', {
          pathParams: { job_id: jobId },
          query: q,
          ...options,
        }),
      query,
    );
  }

  /** Per-training-step metric points (BOND loss, lr, grad_norm, ...) after `since_step`. */
  metrics(
    jobId: string,
    query: DistillationMetricListParams = {},
    options?: RequestOptions,
  ): ItemsPromise<MetricPage, MetricPoint> {
    return metricPoints(
      (q) =>
        this._client.get('/v1/distillation/{job_id}/metrics', {
          pathParams: { job_id: jobId },
          query: q,
          ...options,
        }),
      query,
    );
  }

  /** Durable checkpoints, oldest first: `generation-<n>` and `checkpoint-<step>`. */
  checkpoints(jobId: string, options?: RequestOptions): ItemsPromise<CheckpointList, Checkpoint> {
    const read = this._client.get('/v1/distillation/{job_id}/checkpoints', {
      pathParams: { job_id: jobId },
      ...options,
    });
    return allOf(read, (list) => list.checkpoints);
  }

  /** Queues a failed or cancelled job again, from the named checkpoint or the latest. */
  resume(
    jobId: string,
    body?: DistillationResumeParams,
    options?: RequestOptions,
  ): APIPromise<DistillationJob> {
    return this._client.post('/v1/distillation/{job_id}/resume', {
      pathParams: { job_id: jobId },
      body,
      ...options,
    });
  }

  /** Where the adapter and GGUF files are, and every file's download URL. */
  artifacts(jobId: string, options?: RequestOptions): APIPromise<DistillationArtifacts> {
    return this._client.get('/v1/distillation/{job_id}/artifacts', {
      pathParams: { job_id: jobId },
      ...options,
    });
  }

  /** One artifact's bytes as a web ReadableStream; `range: 'bytes=0-1023'` for part of it. */
  downloadArtifact(
    jobId: string,
    file: string,
    options?: DownloadOptions,
  ): APIPromise<ReadableStream<Uint8Array>> {
    return this._client.getStream('/v1/distillation/{job_id}/artifacts/{file}', {
      pathParams: { job_id: jobId, file },
      ...withRange(options),
    });
  }

  /** Node: saves one artifact to `path`. Resolves with the bytes written. */
  downloadArtifactToFile(
    jobId: string,
    file: string,
    path: string,
    options?: DownloadOptions,
  ): Promise<number> {
    return downloadToPath(this.downloadArtifact(jobId, file, options), path);
  }

  /** Polls until completed, failed or cancelled; see WaitOptions. Failed/cancelled jobs are returned, not thrown. */
  waitForCompletion(jobId: string, options?: WaitOptions<DistillationJob>): Promise<DistillationJob> {
    return waitForJob(jobId, (signal) => this.retrieve(jobId, { signal }), options);
  }

  /**
   * create, then waitForCompletion. `options` are the wait's (its `signal` also aborts the create);
   * `requestOptions` apply to the create call.
   */
  async createAndWait(
    body: DistillationJobCreateParams,
    options?: WaitOptions<DistillationJob>,
    requestOptions?: RequestOptions,
  ): Promise<DistillationJob> {
    const job = await this.create(body, { signal: options?.signal, ...requestOptions });
    return this.waitForCompletion(job.id, options);
  }
}
