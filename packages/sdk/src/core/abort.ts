// Timeouts, the caller's AbortSignal, and sleeping that either can cut short.
import { APIUserAbortError } from './error.js';

/** A signal for one attempt: aborts when the caller's signal does or when `timeoutMs` passes. */
export interface AttemptSignal {
  signal: AbortSignal;
  /** True when the timeout (not the caller) aborted the attempt. */
  timedOut(): boolean;
  /** Stops the timer and, given `timeoutMs`, starts a fresh one (a download's wait for its next chunk). */
  resetTimer(timeoutMs?: number): void;
  /** Stops the timer and unhooks from the caller's signal. Safe to call more than once. */
  dispose(): void;
}

export function attemptSignal(callerSignal: AbortSignal | undefined, timeoutMs: number): AttemptSignal {
  const controller = new AbortController();
  let timedOut = false;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const onCallerAbort = () => controller.abort(callerSignal?.reason);
  if (callerSignal?.aborted) onCallerAbort();
  else callerSignal?.addEventListener('abort', onCallerAbort, { once: true });
  const resetTimer = (ms?: number) => {
    clearTimeout(timer);
    if (ms === undefined) return;
    timer = setTimeout(() => {
      timedOut = true;
      controller.abort(new DOMException('The request timed out.', 'TimeoutError'));
    }, ms);
    // A pending timeout must not keep a Node process alive on its own.
    (timer as { unref?: () => void }).unref?.();
  };
  resetTimer(timeoutMs);
  return {
    signal: controller.signal,
    timedOut: () => timedOut,
    resetTimer,
    dispose() {
      resetTimer();
      callerSignal?.removeEventListener('abort', onCallerAbort);
    },
  };
}

/** Resolves after `ms`; rejects with APIUserAbortError as soon as `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new APIUserAbortError());
    const onAbort = () => {
      clearTimeout(timer);
      reject(new APIUserAbortError());
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
