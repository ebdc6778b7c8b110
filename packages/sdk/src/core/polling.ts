// Waiting for a job to finish by polling it.
import type { components } from '../generated/api.js';
import { sleep } from './abort.js';
import { JobWaitTimeoutError } from './error.js';

type JobStatus = components['schemas']['JobStatus'];

/** Statuses a job never leaves. */
export const TERMINAL_STATUSES: ReadonlySet<JobStatus> = new Set(['completed', 'failed', 'cancelled']);

export function isTerminal(job: { status: JobStatus }): boolean {
  return TERMINAL_STATUSES.has(job.status);
}

export const DEFAULT_POLL_INTERVAL_MS = 2_000;

export interface WaitOptions<Job> {
  /** Milliseconds between polls. Default 2000. */
  pollIntervalMs?: number | undefined;
  /** Give up after this many milliseconds with JobWaitTimeoutError. Default: wait as long as it takes. */
  timeout?: number | undefined;
  /** Stops waiting: rejects with APIUserAbortError. */
  signal?: AbortSignal | undefined;
  /** Called with the job after every poll, the final one included. */
  onProgress?: ((job: Job) => void | Promise<void>) | undefined;
}

/**
 * Polls `retrieve` until the job is completed, failed or cancelled and resolves with it. A failed or
 * cancelled job is returned, not thrown: check `job.status` (and `job.error`).
 */
export async function waitForJob<Job extends { status: JobStatus }>(
  jobId: string,
  retrieve: (signal: AbortSignal | undefined) => Promise<Job>,
  { pollIntervalMs = DEFAULT_POLL_INTERVAL_MS, timeout, signal, onProgress }: WaitOptions<Job> = {},
): Promise<Job> {
  const deadline = timeout === undefined ? Number.POSITIVE_INFINITY : Date.now() + timeout;
  for (;;) {
    const job = await retrieve(signal);
    await onProgress?.(job);
    if (isTerminal(job)) return job;
    const remaining = deadline - Date.now();
    if (remaining <= 0) throw new JobWaitTimeoutError(jobId, timeout ?? 0, job);
    await sleep(Math.min(pollIntervalMs, remaining), signal);
  }
}
