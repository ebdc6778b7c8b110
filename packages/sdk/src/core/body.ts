// Response bodies: a failure while reading one is an SDK error, and a download's body, which the caller
// reads after the call has resolved, keeps a timeout and lets go of the caller's signal when it is done.
import type { AttemptSignal } from './abort.js';
import { APIConnectionError } from './error.js';

/**
 * The same response, except that a failure while reading its body (a socket reset mid-body, which undici
 * reports as `TypeError: terminated`) is an APIConnectionError whose `cause` is the original error.
 */
export function withConnectionErrors(response: Response): Response {
  if (!response.body) return response;
  const reader = response.body.getReader();
  const body = new ReadableStream<Uint8Array>(
    {
      async pull(controller) {
        let chunk: ReadableStreamReadResult<Uint8Array>;
        try {
          chunk = await reader.read();
        } catch (cause) {
          throw new APIConnectionError({
            message: 'Connection lost while reading the response body.',
            cause,
          });
        }
        if (chunk.done) controller.close();
        else controller.enqueue(chunk.value);
      },
      cancel: (reason) => reader.cancel(reason),
    },
    { highWaterMark: 0 },
  );
  const wrapped = new Response(body, response);
  // A new Response has no url; keep the one the request ended at.
  Object.defineProperties(wrapped, {
    url: { value: response.url },
    redirected: { value: response.redirected },
  });
  return wrapped;
}

/**
 * A download's body, handed to the caller unread; it takes the attempt over. Each read waits at most
 * `timeoutMs` for the next chunk: an idle timeout, so a long download is not cut off but a stalled one is,
 * and time the caller spends between reads does not count. The caller's signal still aborts it. Once the
 * body ends, fails or is cancelled, the attempt is disposed, so nothing stays hooked to the caller's signal.
 * `toError` turns a failure into the error the reader sees.
 */
export function guardDownload(
  body: ReadableStream<Uint8Array>,
  attempt: AttemptSignal,
  timeoutMs: number,
  toError: (err: unknown) => unknown,
): ReadableStream<Uint8Array> {
  attempt.resetTimer(); // nothing is waited for until the caller reads
  const reader = body.getReader();
  return new ReadableStream<Uint8Array>(
    {
      async pull(controller) {
        let chunk: ReadableStreamReadResult<Uint8Array>;
        attempt.resetTimer(timeoutMs);
        try {
          chunk = await untilAborted(reader.read(), attempt.signal);
        } catch (err) {
          attempt.dispose();
          reader.cancel(err).catch(() => {});
          throw toError(err);
        }
        attempt.resetTimer();
        if (!chunk.done) return controller.enqueue(chunk.value);
        attempt.dispose();
        controller.close();
      },
      cancel(reason) {
        attempt.dispose();
        return reader.cancel(reason);
      },
    },
    { highWaterMark: 0 },
  );
}

// `promise`, or a rejection with the signal's reason as soon as it aborts (for bodies that ignore it).
function untilAborted<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}
