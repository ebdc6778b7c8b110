import type { APIPromise } from '../../core/api-promise.js';
import type { RequestOptions } from '../../core/client.js';
import { type FollowOptions, followMetricPoints } from '../../core/follow.js';
import type { ItemsPromise, PagePromise } from '../../core/pagination.js';
import { type WaitOptions, waitForJob } from '../../core/polling.js';
import { APIResource } from '../../core/resource.js';
import {
  followJobStream,
  type JobStreamMessage,
  type JobStreamOptions,
  streamQuery,
} from '../../core/stream.js';
import { allOf, logLines, metricPoints, timelineEvents } from '../../core/timeline.js';
import type {
  Checkpoint,
  CheckpointList,
  EventList,
  EventListParams,
  JobEvent,
  LogLine,
  LogListParams,
  LogPage,
  MergeParams,
  MergeResponse,
  MetricListParams,
  MetricPage,
  MetricPoint,
  OutputFile,
  OutputList,
  ResumeParams,
  TrainingJob,
  TrainingJobCreateParams,
  TrainingJobList,
  TrainingJobListParams,
  TrainingResult,
} from '../../types.js';
import { type DownloadOptions, downloadToPath, withRange } from '../downloads.js';

/**
 * Training jobs of every type (`/v1/training/jobs`): finetune (LoRA/QLoRA/full), train (grow),
 * contract, merge, benchmark; and their logs, metrics, events, result, outputs and checkpoints.
 */
export class Jobs extends APIResource {
  /** Submits a job; it starts `pending`. Retries reuse one Idempotency-Key. */
  create(body: TrainingJobCreateParams, options?: RequestOptions): APIPromise<TrainingJob> {
    return this._client.post('/v1/training/jobs', { body, ...options });
  }

  /** Status, phase and progress (`current_step`, `total_steps`, `current_loss`, `progress` %). */
  retrieve(jobId: string, options?: RequestOptions): APIPromise<TrainingJob> {
    return this._client.get('/v1/training/jobs/{job_id}', { pathParams: { job_id: jobId }, ...options });
  }

  /** Alias of `retrieve`. */
  get(jobId: string, options?: RequestOptions): APIPromise<TrainingJob> {
    return this.retrieve(jobId, options);
  }

  /** Newest first, filtered by `status` and `type`. `await` for one page, or `for await` for every job. */
  list(
    query?: TrainingJobListParams,
    options?: RequestOptions,
  ): PagePromise<'jobs', TrainingJob, TrainingJobList> {
    return this._client.getList('/v1/training/jobs', 'jobs', { query, ...options });
  }

  /** Cancels a pending job at once, a running one when its worker acknowledges. A terminal job is a ConflictError. */
  cancel(jobId: string, options?: RequestOptions): APIPromise<TrainingJob> {
    return this._client.post('/v1/training/jobs/{job_id}/cancel', {
      pathParams: { job_id: jobId },
      ...options,
    });
  }

  /** Queues a failed or cancelled job again, from the named checkpoint or the latest. */
  resume(jobId: string, body?: ResumeParams, options?: RequestOptions): APIPromise<TrainingJob> {
    return this._client.post('/v1/training/jobs/{job_id}/resume', {
      pathParams: { job_id: jobId },
      body,
      ...options,
    });
  }

  /** Creates a `merge` job that merges this LoRA job's adapter into its base model. */
  merge(jobId: string, body?: MergeParams, options?: RequestOptions): APIPromise<MergeResponse> {
    return this._client.post('/v1/training/jobs/{job_id}/merge', {
      pathParams: { job_id: jobId },
      body,
      ...options,
    });
  }

  /**
   * Log lines after `since` (a seq), or the last `tail`; at most 1000 per read. `for await` walks
   * every line after `since`, reading on until the last one stored.
   */
  logs(jobId: string, query: LogListParams = {}, options?: RequestOptions): ItemsPromise<LogPage, LogLine> {
    return logLines(
      (q) =>
        this._client.get('/v1/training/jobs/{job_id}/logs', {
          pathParams: { job_id: jobId },
          query: q,
          ...options,
        }),
      query,
    );
  }

  /** Per-step metric points after `since_step`; `for await` walks every point, reading on. */
  metrics(
    jobId: string,
    query: MetricListParams = {},
    options?: RequestOptions,
  ): ItemsPromise<MetricPage, MetricPoint> {
    return metricPoints(
      (q) =>
        this._client.get('/v1/training/jobs/{job_id}/metrics', {
          pathParams: { job_id: jobId },
          query: q,
          ...options,
        }),
      query,
    );
  }

  /** The job's timeline: created, claimed, phase, checkpoint, retry, completed…; `for await` walks it all. */
  events(
    jobId: string,
    query: EventListParams = {},
    options?: RequestOptions,
  ): ItemsPromise<EventList, JobEvent> {
    return timelineEvents(
      (q) =>
        this._client.get('/v1/training/jobs/{job_id}/events', {
          pathParams: { job_id: jobId },
          query: q,
          ...options,
        }),
      query,
    );
  }

  /** Headline result of a completed job (perplexity, params, compute, cost). NotFoundError until then. */
  result(jobId: string, options?: RequestOptions): APIPromise<TrainingResult> {
    return this._client.get('/v1/training/jobs/{job_id}/result', {
      pathParams: { job_id: jobId },
      ...options,
    });
  }

  /** The files the job produced, each with a download URL; `for await` walks the files. */
  outputs(jobId: string, options?: RequestOptions): ItemsPromise<OutputList, OutputFile> {
    const read = this._client.get('/v1/training/jobs/{job_id}/output', {
      pathParams: { job_id: jobId },
      ...options,
    });
    return allOf(read, (list) => list.files);
  }

  /** One output file's bytes as a web ReadableStream; `range: 'bytes=1024-'` to resume a download. */
  download(jobId: string, file: string, options?: DownloadOptions): APIPromise<ReadableStream<Uint8Array>> {
    return this._client.getStream('/v1/training/jobs/{job_id}/output/{file}', {
      pathParams: { job_id: jobId, file },
      ...withRange(options),
    });
  }

  /** Node: saves one output file to `path`. Resolves with the bytes written. */
  downloadToFile(jobId: string, file: string, path: string, options?: DownloadOptions): Promise<number> {
    return downloadToPath(this.download(jobId, file, options), path);
  }

  /** Durable checkpoints, oldest first; any can be named in `resume`. `for await` walks them. */
  checkpoints(jobId: string, options?: RequestOptions): ItemsPromise<CheckpointList, Checkpoint> {
    const read = this._client.get('/v1/training/jobs/{job_id}/checkpoints', {
      pathParams: { job_id: jobId },
      ...options,
    });
    return allOf(read, (list) => list.checkpoints);
  }

  /** Polls until completed, failed or cancelled; see WaitOptions. Failed/cancelled jobs are returned, not thrown. */
  waitForCompletion(jobId: string, options?: WaitOptions<TrainingJob>): Promise<TrainingJob> {
    return waitForJob(jobId, (signal) => this.retrieve(jobId, { signal }), options);
  }

  /**
   * create, then waitForCompletion. `options` are the wait's (its `signal` also aborts the create);
   * `requestOptions` apply to the create call.
   */
  async createAndWait(
    body: TrainingJobCreateParams,
    options?: WaitOptions<TrainingJob>,
    requestOptions?: RequestOptions,
  ): Promise<TrainingJob> {
    const job = await this.create(body, { signal: options?.signal, ...requestOptions });
    return this.waitForCompletion(job.id, options);
  }

  /**
   * The job live, from one server-sent-events connection: log lines, metric points, timeline events
   * and status changes as they are recorded, each once, ending with an `end` message after the job
   * has finished. Reconnects on its own after the last message received; `lastEventId` resumes an
   * earlier stream.
   */
  stream(jobId: string, options?: JobStreamOptions): AsyncGenerator<JobStreamMessage, void, undefined> {
    return followJobStream(
      (lastEventId, signal) =>
        this._client.getStream('/v1/training/jobs/{job_id}/stream', {
          pathParams: { job_id: jobId },
          query: streamQuery(options),
          headers: lastEventId === undefined ? undefined : { 'Last-Event-ID': lastEventId },
          signal,
        }),
      options,
    );
  }

  /**
   * Every log line after `since` (default: all), each once, in `seq` order, until the job has ended
   * and its last lines are sent: the job's live `stream` narrowed to its logs and started after
   * `since`, so each line arrives as it is recorded, over one connection, and earlier ones are not sent.
   */
  async *followLogs(
    jobId: string,
    { since = 0, signal }: { since?: number; signal?: AbortSignal } = {},
  ): AsyncGenerator<LogLine, void, undefined> {
    // a seq the server's position takes: a whole number, 0 (all lines) to 999,999,999
    const seq = Number.isNaN(since) ? 0 : Math.min(Math.max(0, Math.floor(since)), 999_999_999);
    const lastEventId = `l${seq}.e0.m`;
    for await (const message of this.stream(jobId, { signal, include: ['log'], lastEventId })) {
      if (message.type === 'log') yield message.data;
    }
  }

  /** Every metric point after `sinceStep` (default: all), each (step, phase) once, until the job ends. */
  followMetrics(
    jobId: string,
    options: FollowOptions & { sinceStep?: number } = {},
  ): AsyncGenerator<MetricPoint, void, undefined> {
    return followMetricPoints(
      (sinceStep, signal) => this.metrics(jobId, { since_step: sinceStep }, { signal }),
      (signal) => this.retrieve(jobId, { signal }),
      options,
    );
  }
}
