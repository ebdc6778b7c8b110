import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  APIUserAbortError,
  ConflictError,
  type JobStreamMessage,
  JobWaitTimeoutError,
  type LogLine,
  type MetricPoint,
  NotFoundError,
  type TrainingJob,
} from '../../../src/index.js';
import { useMockServer } from '../../helpers.js';

const { mock, client } = useMockServer();
const tunery = () => client();
const finetune = { base_model: 'tiny-llama', train_texts: ['### Instruction:\nSay hi\n\n### Response:\nhi'] };
const fast = { pollIntervalMs: 1 };

describe('jobs: create, retrieve, list, cancel', () => {
  it('stay consistent with each other', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create({ ...finetune, training_config: { max_steps: 30 }, run_name: 'first' });
    expect(job).toMatchObject({
      status: 'pending',
      phase: 'queued',
      total_steps: 30,
      type: 'finetune',
      method: 'lora',
    });
    expect(await jobs.retrieve(job.id)).toEqual(job);
    expect(await jobs.get(job.id)).toEqual(job);
    const page = await jobs.list();
    expect(page.data.map((j) => j.id)).toEqual([job.id]);
    const cancelled = await jobs.cancel(job.id);
    expect(cancelled.status).toBe('cancelled');
    expect((await jobs.list({ status: 'cancelled' })).data).toHaveLength(1);
    expect((await jobs.list({ status: 'pending' })).data).toHaveLength(0);
    expect((await jobs.list({ type: 'merge' })).data).toHaveLength(0);
    await expect(jobs.cancel(job.id)).rejects.toMatchObject({ status: 409, code: 'job_already_finished' });
  });

  it('cancels a running job once its worker acknowledges', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create(finetune);
    mock.advanceJob(job.id, 'running');
    const flagged = await jobs.cancel(job.id);
    expect(flagged).toMatchObject({ status: 'running', cancel_requested: true });
    mock.advanceJob(job.id, 'cancelled');
    expect(await jobs.retrieve(job.id)).toMatchObject({ status: 'cancelled', cancel_requested: false });
  });

  it('throws NotFoundError for an unknown job', async () => {
    const error = await tunery()
      .training.jobs.retrieve('job_nope')
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(NotFoundError);
    expect(error).toMatchObject({ code: 'job_not_found', param: 'job_id' });
  });
});

describe('waitForCompletion', () => {
  it('polls until completed, reporting progress', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create(finetune);
    const seen: string[] = [];
    const advance = setInterval(() => mock.tickJob(job.id), 2);
    const done = await jobs.waitForCompletion(job.id, {
      ...fast,
      onProgress: (j) => {
        seen.push(`${j.status}:${j.current_step}`);
      },
    });
    clearInterval(advance);
    expect(done.status).toBe('completed');
    expect(done.current_step).toBe(60);
    expect(seen.at(-1)).toBe('completed:60');
  });

  it('returns a failed job instead of throwing', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create(finetune);
    mock.advanceJob(job.id, 'failed');
    const done = await jobs.waitForCompletion(job.id, fast);
    expect(done).toMatchObject({ status: 'failed', error: { code: 'training_error' } });
  });

  it('throws JobWaitTimeoutError with the last job seen', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create(finetune);
    const error = await jobs
      .waitForCompletion(job.id, { pollIntervalMs: 10, timeout: 50 })
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(JobWaitTimeoutError);
    expect(error).toMatchObject({ jobId: job.id, timeoutMs: 50, lastJob: { id: job.id, status: 'pending' } });
  });

  it('stops on abort', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create(finetune);
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 30);
    await expect(
      jobs.waitForCompletion(job.id, { pollIntervalMs: 5, signal: controller.signal }),
    ).rejects.toBeInstanceOf(APIUserAbortError);
  });
});

describe('logs and metrics', () => {
  it('reads logs since a seq or the last lines, and metrics since a step', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create(finetune);
    mock.advanceJob(job.id, { step: 30 });
    const all = await jobs.logs(job.id);
    expect(all.lines.map((l) => l.seq)).toEqual(all.lines.map((_, i) => i + 1));
    const later = await jobs.logs(job.id, { since: 2 });
    expect(later.lines[0]?.seq).toBe(3);
    expect((await jobs.logs(job.id, { tail: 1 })).lines).toHaveLength(1);
    const metrics = await jobs.metrics(job.id, { since_step: 25 });
    expect(metrics.points.map((p) => p.step)).toEqual([26, 27, 28, 29, 30]);
    expect(metrics.latest_step).toBe(30);
  });

  it('walks every log line, metric point, event, checkpoint and output with for await', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create(finetune);
    mock.advanceJob(job.id, { step: 30 });
    // An eval point at the same step as a train point, so that a read of 3 ends between them.
    const points = mock.state.metrics.get(job.id)!;
    points.splice(points.findIndex((p) => p.step === 3) + 1, 0, { step: 3, phase: 'eval', eval_loss: 1.5 });
    mock.advanceJob(job.id, 'completed');

    const walk = async <T>(items: AsyncIterable<T>) => {
      const seen: T[] = [];
      for await (const item of items) seen.push(item);
      return seen;
    };
    const byThree = await walk(jobs.metrics(job.id, { limit: 3 }));
    expect(byThree).toEqual((await jobs.metrics(job.id)).points);
    expect(byThree.filter((p) => p.step === 3).map((p) => p.phase)).toEqual(['train', 'eval']);
    const metricReads = mock.state.requests.filter((r) => r.operationId === 'listTrainingJobMetrics');
    expect(metricReads.length).toBeGreaterThan(10);

    // The last read ends between the train and eval points of the final step: it still ends.
    const final = mock.state.metrics.get(job.id)!;
    final.push({ step: final.at(-1)!.step, phase: 'eval', eval_loss: 1.2 });
    const all = (await jobs.metrics(job.id)).points;
    expect(await walk(jobs.metrics(job.id, { limit: all.length - 1 }))).toEqual(all);
    // A limit of 1 cannot hold a step's two points: the walk still ends, every step once at least.
    const one = await walk(jobs.metrics(job.id, { limit: 1 }));
    expect(new Set(one.map((p) => p.step))).toEqual(new Set(all.map((p) => p.step)));
    expect(new Set(one.map((p) => `${p.step}/${p.phase}`)).size).toBe(one.length);

    expect(await walk(jobs.logs(job.id))).toEqual((await jobs.logs(job.id)).lines);
    expect((await walk(jobs.logs(job.id, { since: 2 })))[0]?.seq).toBe(3);
    expect(await walk(jobs.events(job.id))).toEqual((await jobs.events(job.id)).events);
    expect(await walk(jobs.checkpoints(job.id))).toEqual((await jobs.checkpoints(job.id)).checkpoints);
    const files = await walk(jobs.outputs(job.id));
    expect(files.map((f) => f.name)).toEqual((await jobs.outputs(job.id)).files.map((f) => f.name));
    expect(files.length).toBeGreaterThan(0);
  });

  it('followLogs yields every line once, in order, until the job ends', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create(finetune);
    const lines: LogLine[] = [];
    // Work happens while we read: the job moves one tick every few milliseconds.
    const worker = setInterval(() => mock.tickJob(job.id), 3);
    for await (const line of jobs.followLogs(job.id)) lines.push(line);
    clearInterval(worker);
    const stored = mock.state.logs.get(job.id) ?? [];
    expect(mock.state.trainingJobs.get(job.id)?.status).toBe('completed');
    expect(lines.map((l) => l.seq)).toEqual(stored.map((l) => l.seq));
    expect(lines.at(-1)?.text).toMatch(/^completed/);
  });

  it('stream yields each log line, metric point and event once, and status changes, until end', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create(finetune);
    const messages: JobStreamMessage[] = [];
    // Work happens while we read; each connection sends what is new and closes, so the SDK reconnects.
    const worker = setInterval(() => mock.tickJob(job.id), 3);
    for await (const message of jobs.stream(job.id)) messages.push(message);
    clearInterval(worker);
    const seqs = (type: 'log' | 'event') => messages.flatMap((m) => (m.type === type ? [m.data.seq] : []));
    expect(seqs('log')).toEqual((mock.state.logs.get(job.id) ?? []).map((l) => l.seq));
    expect(seqs('event')).toEqual((mock.state.events.get(job.id) ?? []).map((e) => e.seq));
    const metrics = messages.filter((m) => m.type === 'metric');
    expect(metrics).toHaveLength(mock.state.metrics.get(job.id)?.length ?? -1);
    const statuses = messages.flatMap((m) => (m.type === 'status' ? [m.data.status] : []));
    expect(statuses[0]).toBe('pending');
    expect(statuses.at(-1)).toBe('completed');
    expect(messages.at(-1)).toMatchObject({ type: 'end', data: { status: 'completed' } });
    // Every reconnection continued after the last message received.
    const streams = mock.state.requests.filter((r) => r.operationId === 'streamTrainingJob');
    expect(streams.length).toBeGreaterThan(1);
    expect(streams.slice(1).every((r) => r.headers['last-event-id'])).toBe(true);
  });

  it('followLogs resumes after `since` and drains lines written as the job ended', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create(finetune);
    mock.advanceJob(job.id, 'completed');
    const lines: number[] = [];
    for await (const line of jobs.followLogs(job.id, { since: 3 })) lines.push(line.seq);
    const stored = mock.state.logs.get(job.id) ?? [];
    expect(lines).toEqual(stored.filter((l) => l.seq > 3).map((l) => l.seq));
    // The stream itself started after line 3 and carried logs only: nothing earlier was sent.
    const streams = mock.state.requests.filter((r) => r.operationId === 'streamTrainingJob');
    expect(streams[0]?.headers['last-event-id']).toBe('l3.e0.m');
    expect(streams.every((r) => new URL(r.url).searchParams.get('include') === 'log')).toBe(true);
  });

  it('followMetrics yields each (step, phase) once, including an eval point that lands late', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create({ ...finetune, training_config: { max_steps: 10 } });
    mock.advanceJob(job.id, { step: 5 });
    const points: MetricPoint[] = [];
    const iterator = jobs.followMetrics(job.id, { pollIntervalMs: 1 });
    for await (const point of iterator) {
      points.push(point);
      if (point.step === 5 && point.phase === 'train') {
        // The eval point of step 5 arrives after its train point was read.
        mock.state.metrics.get(job.id)?.push({ step: 5, phase: 'eval', eval_loss: 1.5 });
        mock.advanceJob(job.id, 'completed');
      }
    }
    expect(points.map((p) => `${p.step}${p.phase[0]}`)).toEqual([
      ...[1, 2, 3, 4, 5].map((s) => `${s}t`),
      '5e',
      ...[6, 7, 8, 9, 10].map((s) => `${s}t`),
    ]);
  });

  it('followLogs stops with APIUserAbortError on abort', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create(finetune);
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 30);
    const read = async () => {
      for await (const _ of jobs.followLogs(job.id, { signal: controller.signal })) {
        // keep reading
      }
    };
    await expect(read()).rejects.toBeInstanceOf(APIUserAbortError);
  });
});

describe('resume, merge, downloads', () => {
  let dir: string | undefined;
  afterEach(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
    dir = undefined;
  });

  it('resumes a failed job from its latest checkpoint', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create(finetune);
    mock.advanceJob(job.id, { step: 25 });
    mock.advanceJob(job.id, 'failed');
    const resumed = await jobs.resume(job.id);
    expect(resumed).toMatchObject({ status: 'pending', current_step: 20, last_checkpoint_step: 20 });
    await expect(jobs.resume(job.id)).rejects.toMatchObject({ code: 'job_not_resumable' });
    mock.advanceJob(job.id, 'failed');
    await expect(jobs.resume(job.id, { checkpoint: 'checkpoint-999' })).rejects.toBeInstanceOf(NotFoundError);
  });

  it('merges a completed LoRA job into a merge job', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create(finetune);
    await expect(jobs.merge(job.id)).rejects.toBeInstanceOf(ConflictError);
    mock.advanceJob(job.id, 'completed');
    const { merge_job_id, job: merge } = await jobs.merge(job.id, {
      export_gguf: true,
      quantization_types: ['q4_k_m'],
    });
    expect(merge).toMatchObject({ id: merge_job_id, type: 'merge', parent_job_id: job.id, method: null });
    mock.advanceJob(merge_job_id, 'completed');
    const files = (await jobs.outputs(merge_job_id)).files.map((f) => f.name);
    expect(files).toContain('model-q4_k_m.gguf');
  });

  it('downloads an output as a stream, a range of it, or to a file', async () => {
    const jobs = tunery().training.jobs;
    const job = await jobs.create(finetune);
    mock.advanceJob(job.id, 'completed');
    const stored = mock.state.outputs.get(job.id)?.get('adapter_model.safetensors');
    const whole = new Uint8Array(
      await new Response(await jobs.download(job.id, 'adapter_model.safetensors')).arrayBuffer(),
    );
    expect(whole).toEqual(stored?.bytes);

    const { data, response } = await jobs
      .download(job.id, 'adapter_model.safetensors', { range: 'bytes=10-19' })
      .withResponse();
    expect(response.status).toBe(206);
    expect(response.headers.get('content-range')).toBe(`bytes 10-19/${stored?.bytes.length}`);
    expect(new Uint8Array(await new Response(data).arrayBuffer())).toEqual(stored?.bytes.slice(10, 20));

    await expect(
      jobs.download(job.id, 'adapter_model.safetensors', { range: 'bytes=999999-' }),
    ).rejects.toMatchObject({
      status: 416,
      code: 'range_not_satisfiable',
    });

    dir = await mkdtemp(join(tmpdir(), 'tunery-'));
    const path = join(dir, 'adapter.safetensors');
    const bytes = await jobs.downloadToFile(job.id, 'adapter_model.safetensors', path);
    expect(bytes).toBe(stored?.bytes.length);
    expect(new Uint8Array(await readFile(path))).toEqual(stored?.bytes);
  });
});

describe('jobs list typing in practice', () => {
  it('filters by status and type together', async () => {
    const jobs = tunery().training.jobs;
    const a = await jobs.create(finetune);
    await jobs.create({ ...finetune, type: 'train', hyperparams: { turns: 1 } });
    mock.advanceJob(a.id, 'completed');
    const completed: TrainingJob[] = [];
    for await (const job of jobs.list({ status: 'completed', type: 'finetune' })) completed.push(job);
    expect(completed.map((j) => j.id)).toEqual([a.id]);
  });
});
