// Registers handlers through openapi-msw (so paths, params and bodies are typed from the spec) and
// wraps each with what every route shares: request log, injected failures, auth, thrown errors.
import { type HttpHandler, HttpResponse } from 'msw';
import { createOpenApiHttp, type ResponseResolver } from 'openapi-msw';
import type { paths } from '../generated/api.js';
import { DEFAULT_ERROR_CODES, MockHttpError } from './errors.js';
import type { MockState, OperationId } from './state.js';

type Method = 'get' | 'post' | 'put' | 'delete';
type PathsFor<M extends Method> = {
  [P in keyof paths]: paths[P] extends Record<M, { responses: unknown }> ? P : never;
}[keyof paths];

/** A failure queued with `failNext`. */
export interface InjectedFailure {
  /** HTTP status, or 'network' for a connection error (no response at all). */
  status: number | 'network';
  code?: string | undefined;
  message?: string | undefined;
  param?: string | null | undefined;
  headers?: Record<string, string> | undefined;
}

export interface RouteInfo {
  operationId: OperationId;
  method: Method;
  path: string;
}

export interface RouterOptions {
  baseURL: string;
  state: MockState;
  failures: Map<OperationId, InjectedFailure[]>;
  /** When set, user endpoints require `Authorization: Bearer <apiKey>`. */
  apiKey?: string | undefined;
  /** When set, worker endpoints require `Authorization: Bearer <workerToken>`. */
  workerToken?: string | undefined;
}

export class Router {
  readonly handlers: HttpHandler[] = [];
  readonly routes: RouteInfo[] = [];
  readonly #http: ReturnType<typeof createOpenApiHttp<paths>>;

  constructor(private readonly options: RouterOptions) {
    this.#http = createOpenApiHttp<paths>({ baseUrl: options.baseURL });
  }

  get<P extends PathsFor<'get'>>(
    path: P,
    operationId: OperationId,
    resolver: ResponseResolver<paths, P, 'get'>,
  ) {
    this.#add('get', path, operationId, this.#http.get(path, this.#wrap(operationId, path, resolver)));
  }

  post<P extends PathsFor<'post'>>(
    path: P,
    operationId: OperationId,
    resolver: ResponseResolver<paths, P, 'post'>,
  ) {
    this.#add('post', path, operationId, this.#http.post(path, this.#wrap(operationId, path, resolver)));
  }

  put<P extends PathsFor<'put'>>(
    path: P,
    operationId: OperationId,
    resolver: ResponseResolver<paths, P, 'put'>,
  ) {
    this.#add('put', path, operationId, this.#http.put(path, this.#wrap(operationId, path, resolver)));
  }

  delete<P extends PathsFor<'delete'>>(
    path: P,
    operationId: OperationId,
    resolver: ResponseResolver<paths, P, 'delete'>,
  ) {
    this.#add('delete', path, operationId, this.#http.delete(path, this.#wrap(operationId, path, resolver)));
  }

  #add(method: Method, path: string, operationId: OperationId, handler: HttpHandler) {
    this.routes.push({ operationId, method, path });
    this.handlers.push(handler);
  }

  #wrap<R extends (info: never) => unknown>(operationId: OperationId, path: string, resolver: R): R {
    const wrapped = async (info: {
      request: Request;
      response: { untyped(response: Response): unknown };
    }) => {
      const { state, failures } = this.options;
      const request = info.request;
      state.requests.push({
        operationId,
        method: request.method,
        url: request.url,
        headers: Object.fromEntries(request.headers.entries()),
      });
      try {
        const failure = failures.get(operationId)?.shift();
        if (failure?.status === 'network') return HttpResponse.error();
        if (failure) throw injectedError(failure);
        this.#authorize(path, request);
        return await (resolver as unknown as (i: typeof info) => unknown)(info);
      } catch (err) {
        if (err instanceof MockHttpError) return info.response.untyped(err.toResponse());
        throw err;
      }
    };
    return wrapped as unknown as R;
  }

  #authorize(path: string, request: Request) {
    if (path === '/v1/health' || path === '/v1/version') return;
    const expected = path.startsWith('/v1/workers/') ? this.options.workerToken : this.options.apiKey;
    if (expected === undefined) return;
    if (request.headers.get('authorization') !== `Bearer ${expected}`) {
      throw new MockHttpError(401, 'unauthorized', 'Missing or invalid API key.');
    }
  }
}

function injectedError(failure: InjectedFailure): MockHttpError {
  const status = failure.status as number;
  const code =
    failure.code ?? DEFAULT_ERROR_CODES[status] ?? (status >= 500 ? 'internal_error' : 'invalid_request');
  const message = failure.message ?? `Injected ${status} ${code}.`;
  return new MockHttpError(status, code, message, failure.param ?? null, failure.headers);
}
