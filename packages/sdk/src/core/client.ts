// The one place that talks HTTP: headers, idempotency keys, timeouts, retries and logging around
// openapi-fetch. Resource classes only describe which operation to call.
import createClient, { type Client, type Middleware } from 'openapi-fetch';
import type { paths } from '../generated/api.js';
import { attemptSignal, sleep } from './abort.js';
import { APIPromise, type WithResponse } from './api-promise.js';
import { guardDownload, withConnectionErrors } from './body.js';
import { isRunningInBrowser, readEnv, SDK_VERSION } from './env.js';
import {
  APIConnectionError,
  APIConnectionTimeoutError,
  APIError,
  APIUserAbortError,
  TuneryError,
  UnparsableResponseError,
} from './error.js';
import { newIdempotencyKey, takesIdempotencyKey } from './idempotency.js';
import { isLogLevel, type Logger, type LogLevel, levelledLogger } from './log.js';
import { type ListEnvelope, type PagePosition, PagePromise } from './pagination.js';
import { retryDelayMs, shouldRetry } from './retry.js';
import type {
  HttpMethod,
  JsonRequestBody,
  OperationAt,
  PathParams,
  PathsWith,
  QueryParams,
  SuccessBody,
} from './types.js';

/** A fetch implementation: globalThis.fetch, undici's, node-fetch's, a test double… */
export type Fetch = (input: Request, init?: RequestInit) => Promise<Response>;

/** Headers; a null value removes a default header. */
export type HeadersRecord = Record<string, string | null | undefined>;

export const DEFAULT_BASE_URL = 'http://127.0.0.1:8000';
export const DEFAULT_TIMEOUT_MS = 10 * 60 * 1000;
export const DEFAULT_MAX_RETRIES = 2;

export interface ClientOptions {
  /** API key sent as `Authorization: Bearer …`. Default: `TUNERY_API_KEY`. */
  apiKey?: string | null | undefined;
  /** Server root, without `/v1`. Default: `TUNERY_BASE_URL`, else `http://127.0.0.1:8000`. */
  baseURL?: string | null | undefined;
  /**
   * Milliseconds one attempt may take before it is aborted (and retried). Default 10 minutes. A download's
   * body, read after the call resolves, gets this long to deliver each chunk instead.
   */
  timeout?: number | undefined;
  /** Retries after the first attempt, for connection errors, 408, transient 409, 429 and 5xx. Default 2. */
  maxRetries?: number | undefined;
  /** Headers sent with every request. */
  defaultHeaders?: HeadersRecord | undefined;
  /** The fetch to use. Default: globalThis.fetch, looked up at each request. */
  fetch?: Fetch | undefined;
  /** Extra RequestInit passed to every fetch call (e.g. an undici `dispatcher`). */
  fetchOptions?: RequestInit | undefined;
  /** Where log lines go. Default: console. */
  logger?: Logger | undefined;
  /** Least severe level logged. Default: `TUNERY_LOG`, else `warn`. */
  logLevel?: LogLevel | undefined;
  /**
   * Allow the client in a browser. Off by default: an API key shipped to a web page can be read by
   * anyone who opens it, so only set this for a key that may be public (a scoped, revocable one) or
   * behind your own proxy. The server must also allow the page's origin (`TUNERY_CORS_ORIGINS`).
   */
  dangerouslyAllowBrowser?: boolean | undefined;
}

/** Per-call options, accepted as the last argument of every API method. */
export interface RequestOptions {
  /** Overrides the client's timeout for this call (per attempt, ms). */
  timeout?: number | undefined;
  /** Overrides the client's maxRetries for this call. */
  maxRetries?: number | undefined;
  /** Aborts the call (and any wait between retries): rejects with APIUserAbortError. */
  signal?: AbortSignal | undefined;
  /** Extra headers for this call; null removes a default. */
  headers?: HeadersRecord | undefined;
  /** Idempotency-Key for a creating POST. Default: a fresh UUID per call, reused by its retries. */
  idempotencyKey?: string | undefined;
  /** Extra RequestInit for this call's fetch. */
  fetchOptions?: RequestInit | undefined;
}

/** Everything one operation call needs, typed from the operation `Op` in the spec. */
export interface CallOptions<Op> extends RequestOptions {
  pathParams?: PathParams<Op> | undefined;
  query?: QueryParams<Op> | undefined;
  /** The JSON body. */
  body?: JsonRequestBody<Op> | undefined;
  /** A multipart body, built afresh for every attempt. */
  multipart?: (() => Promise<FormData>) | undefined;
}

interface InternalOptions extends RequestOptions {
  pathParams?: Record<string, unknown> | undefined;
  query?: Record<string, unknown> | undefined;
  body?: unknown;
  multipart?: (() => Promise<FormData>) | undefined;
  parseAs?: 'json' | 'stream';
}

type ItemOf<Body, K extends keyof Body> = Body[K] extends readonly (infer Item)[] ? Item : never;

export class TuneryClient {
  readonly apiKey: string | null;
  readonly baseURL: string;
  readonly timeout: number;
  readonly maxRetries: number;
  readonly logger: Logger;
  readonly logLevel: LogLevel;

  readonly #api: Client<paths>;
  readonly #fetch: Fetch | undefined;
  readonly #fetchOptions: RequestInit | undefined;
  readonly #defaultHeaders: HeadersRecord;

  constructor(options: ClientOptions = {}) {
    if (!options.dangerouslyAllowBrowser && isRunningInBrowser()) {
      throw new TuneryError(
        'The Tunery client is running in a browser, where its API key would be readable by anyone. ' +
          'Call the API from your server, or pass `dangerouslyAllowBrowser: true` if you understand the risk.',
      );
    }
    this.apiKey = options.apiKey ?? readEnv('TUNERY_API_KEY') ?? null;
    this.baseURL = (options.baseURL ?? readEnv('TUNERY_BASE_URL') ?? DEFAULT_BASE_URL).replace(/\/+$/, '');
    this.timeout = options.timeout ?? DEFAULT_TIMEOUT_MS;
    this.maxRetries = options.maxRetries ?? DEFAULT_MAX_RETRIES;
    const envLevel = readEnv('TUNERY_LOG');
    this.logLevel = options.logLevel ?? (isLogLevel(envLevel) ? envLevel : 'warn');
    this.logger = levelledLogger(options.logger ?? console, this.logLevel);
    this.#fetch = options.fetch;
    this.#fetchOptions = options.fetchOptions;
    this.#defaultHeaders = { ...options.defaultHeaders };
    this.#api = createClient<paths>({ baseUrl: this.baseURL });
  }

  /** Registers openapi-fetch middleware; it runs on every attempt, retries included. */
  use(...middleware: Middleware[]): void {
    this.#api.use(...middleware);
  }

  /** Unregisters middleware added with `use`. */
  eject(...middleware: Middleware[]): void {
    this.#api.eject(...middleware);
  }

  get<P extends PathsWith<'get'>>(
    path: P,
    options?: CallOptions<OperationAt<P, 'get'>>,
  ): APIPromise<SuccessBody<OperationAt<P, 'get'>>> {
    return this.request('get', path, options as InternalOptions);
  }

  post<P extends PathsWith<'post'>>(
    path: P,
    options?: CallOptions<OperationAt<P, 'post'>>,
  ): APIPromise<SuccessBody<OperationAt<P, 'post'>>> {
    return this.request('post', path, options as InternalOptions);
  }

  put<P extends PathsWith<'put'>>(
    path: P,
    options?: CallOptions<OperationAt<P, 'put'>>,
  ): APIPromise<SuccessBody<OperationAt<P, 'put'>>> {
    return this.request('put', path, options as InternalOptions);
  }

  delete<P extends PathsWith<'delete'>>(
    path: P,
    options?: CallOptions<OperationAt<P, 'delete'>>,
  ): APIPromise<SuccessBody<OperationAt<P, 'delete'>>> {
    return this.request('delete', path, options as InternalOptions);
  }

  /** A GET whose body is returned unread, as a web ReadableStream. */
  getStream<P extends PathsWith<'get'>>(
    path: P,
    options?: CallOptions<OperationAt<P, 'get'>>,
  ): APIPromise<ReadableStream<Uint8Array>> {
    return this.request('get', path, { ...(options as InternalOptions), parseAs: 'stream' });
  }

  /** A GET of a list operation whose items are under `key`, as an auto-paginating PagePromise. */
  getList<
    P extends PathsWith<'get'>,
    K extends keyof SuccessBody<OperationAt<P, 'get'>> & string,
    Op extends OperationAt<P, 'get'> = OperationAt<P, 'get'>,
  >(
    path: P,
    key: K,
    options?: CallOptions<Op>,
  ): PagePromise<
    K,
    ItemOf<SuccessBody<Op>, K>,
    SuccessBody<Op> & ListEnvelope<K, ItemOf<SuccessBody<Op>, K>>
  > {
    type Body = SuccessBody<Op> & ListEnvelope<K, ItemOf<SuccessBody<Op>, K>>;
    const { offset, after, ...filters } = (options?.query ?? {}) as {
      offset?: number;
      after?: string;
    };
    const fetchPage = (position: PagePosition) =>
      this.request<Body>('get', path, {
        ...(options as InternalOptions),
        query: { ...filters, ...position },
      }).withResponse();
    return new PagePromise(key, after === undefined ? { offset: offset ?? 0 } : { after }, fetchPage);
  }

  /** Calls one operation; the typed methods above are what resources use. */
  request<T>(method: HttpMethod, path: string, options: InternalOptions = {}): APIPromise<T> {
    return new APIPromise(this.#makeRequest<T>(method, path, options));
  }

  async #makeRequest<T>(
    method: HttpMethod,
    path: string,
    options: InternalOptions,
  ): Promise<WithResponse<T>> {
    const maxRetries = options.maxRetries ?? this.maxRetries;
    const timeout = options.timeout ?? this.timeout;
    const callerSignal = options.signal;
    // One key for the whole call, so that every retry of a create is recognised as the same create.
    const idempotencyKey =
      options.idempotencyKey ?? (takesIdempotencyKey(method, path) ? newIdempotencyKey() : undefined);
    const headers = this.#headers(options.headers, idempotencyKey, options.parseAs ?? 'json');
    const label = `${method.toUpperCase()} ${path}`;

    for (let attempt = 0; ; attempt++) {
      const retriesLeft = maxRetries - attempt;
      // The server's logs tell a retry from a first attempt (and count them).
      headers['x-tunery-retry-count'] = String(attempt);
      if (callerSignal?.aborted) throw new APIUserAbortError();
      this.logger.debug(`${label} (attempt ${attempt + 1}/${maxRetries + 1})`);
      const attemptAbort = attemptSignal(callerSignal, timeout);
      let result: { data?: unknown; error?: unknown; response: Response } | undefined;
      let download: ReadableStream<Uint8Array> | undefined;
      try {
        result = await this.#api.request(
          method,
          path as never,
          {
            params: { path: options.pathParams, query: options.query },
            body: options.multipart ? await options.multipart() : options.body,
            ...(options.multipart ? { bodySerializer: (body: unknown) => body } : {}),
            headers,
            // JSON is parsed below, so that a 2xx body that is not JSON becomes an UnparsableResponseError.
            parseAs: options.parseAs === 'stream' ? 'stream' : 'text',
            signal: attemptAbort.signal,
            fetch: (request: Request) => this.#send(request, options.fetchOptions),
          } as never,
        );
        if (options.parseAs === 'stream' && result.response.ok && result.data) {
          download = guardDownload(result.data as ReadableStream<Uint8Array>, attemptAbort, timeout, (err) =>
            classifyFailure(err, callerSignal, attemptAbort.timedOut()),
          );
        }
      } catch (err) {
        const failure = classifyFailure(err, callerSignal, attemptAbort.timedOut());
        if (!(failure instanceof APIConnectionError) || retriesLeft <= 0) throw failure;
        const delay = retryDelayMs(attempt, undefined);
        this.logger.info(
          `${label}: ${failure.message} Retrying in ${Math.round(delay)} ms (${retriesLeft} left).`,
        );
        await sleep(delay, callerSignal);
        continue;
      } finally {
        // A download's body is still to be read: the guarded stream disposes of the attempt when it is done.
        if (!download) attemptAbort.dispose();
      }

      const { response } = result;
      const requestId = response.headers.get('x-request-id');
      this.logger.debug(`${label} → ${response.status}${requestId ? ` (request ${requestId})` : ''}`);
      if (response.ok) {
        const data = options.parseAs === 'stream' ? download : parseJson(result.data, response);
        return { data: data as T, response, requestId };
      }

      const status = response.status;
      const code = errorCode(result.error);
      if (retriesLeft > 0 && shouldRetry({ status, code, headers: response.headers })) {
        const delay = retryDelayMs(attempt, response.headers);
        this.logger.info(
          `${label} → ${status}${code ? ` ${code}` : ''}. Retrying in ${Math.round(delay)} ms (${retriesLeft} left).`,
        );
        await sleep(delay, callerSignal);
        continue;
      }
      const error = APIError.generate(status, result.error, undefined, response.headers);
      this.logger.debug(`${label} failed: ${error.message}`);
      throw error;
    }
  }

  #headers(
    perCall: HeadersRecord | undefined,
    idempotencyKey: string | undefined,
    parseAs: 'json' | 'stream',
  ): HeadersRecord {
    return {
      // Downloads answer bytes, and errors answer JSON either way.
      Accept: parseAs === 'stream' ? 'application/octet-stream, application/json' : 'application/json',
      // Tells the server's logs who called; not from a page, where it would need a CORS preflight.
      ...(isRunningInBrowser() ? {} : { 'User-Agent': `tunery-sdk-js/${SDK_VERSION}` }),
      ...(this.apiKey ? { Authorization: `Bearer ${this.apiKey}` } : {}),
      ...(idempotencyKey ? { 'Idempotency-Key': idempotencyKey } : {}),
      ...this.#defaultHeaders,
      ...perCall,
    };
  }

  async #send(request: Request, perCallFetchOptions: RequestInit | undefined): Promise<Response> {
    // The request already carries the attempt's signal (timeout + caller); a signal here would replace it.
    const { signal: _signal, ...fetchOptions } = { ...this.#fetchOptions, ...perCallFetchOptions };
    const fetch = this.#fetch ?? globalThis.fetch;
    let response: Response;
    try {
      response = await (Object.keys(fetchOptions).length ? fetch(request, fetchOptions) : fetch(request));
    } catch (cause) {
      throw new APIConnectionError({ cause });
    }
    return withConnectionErrors(response);
  }
}

// Which error a thrown attempt becomes: the caller's abort wins, then our timeout, then the rest.
function classifyFailure(err: unknown, callerSignal: AbortSignal | undefined, timedOut: boolean): unknown {
  if (callerSignal?.aborted) return new APIUserAbortError();
  if (timedOut) return new APIConnectionTimeoutError();
  return err;
}

// The body of a 2xx JSON response, read as text by openapi-fetch (undefined when empty).
function parseJson(text: unknown, response: Response): unknown {
  if (typeof text !== 'string' || text === '') return undefined;
  try {
    return JSON.parse(text);
  } catch (cause) {
    throw new UnparsableResponseError(response, text, cause);
  }
}

function errorCode(body: unknown): string | undefined {
  const code = (body as { error?: { code?: unknown } } | undefined)?.error?.code;
  return typeof code === 'string' ? code : undefined;
}
