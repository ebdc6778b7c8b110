// Timeouts, the caller's AbortSignal, and sleeping that either can cut short.
import { APIUserAbortError } from './error.js';

/** A signal for one attempt: aborts when the caller's signal does or when `timeoutMs` passes. */
export interface AttemptSignal {
  signal: AbortSignal;
  /** True when the timeout (not the caller) aborted the attempt. */
  timedOut(): boolean;
  /** Stops the timer and, unless told to keep it, unhooks from the caller's signal. */
  dispose(options?: { keepCallerLink?: boolean }): void;
}

export function attemptSignal(callerSignal: AbortSignal | undefined, timeoutMs: number): AttemptSignal {
  const controller = new AbortController();
  let timedOut = false;
  const onCallerAbort = () => controller.abort(callerSignal?.reason);
  if (callerSignal?.aborted) onCallerAbort();
  else callerSignal?.addEventListener('abort', onCallerAbort, { once: true });
  const timer = setTimeout(() => {
    timedOut = true;
    controller.abort(new DOMException('The request timed out.', 'TimeoutError'));
  }, timeoutMs);
  // A pending timeout must not keep a Node process alive on its own.
  (timer as { unref?: () => void }).unref?.();
  return {
    signal: controller.signal,
    timedOut: () => timedOut,
    dispose({ keepCallerLink = false } = {}) {
      clearTimeout(timer);
      if (!keepCallerLink) callerSignal?.removeEventListener('abort', onCallerAbort);
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
