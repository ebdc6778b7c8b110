/**
 * `@tunery/sdk/mocks`: msw handlers for every operation of the Tunery API, backed by a small stateful
 * fake, so that code using the SDK (or any HTTP client) can be contract-tested without a server.
 *
 * ```ts
 * import { setupServer } from 'msw/node';
 * import { createTuneryMock } from '@tunery/sdk/mocks';
 *
 * const mock = createTuneryMock({ autoAdvance: true });
 * const server = setupServer(...mock.handlers);
 * ```
 */
import { type HttpHandler, HttpResponse, http } from 'msw';
import type { ResponseOf } from '../core/types.js';
import type { components } from '../generated/api.js';
import type { MockContext } from './context.js';
import { adapterHandlers } from './handlers/adapters.js';
import { adminHandlers } from './handlers/admin.js';
import { budgetHandlers } from './handlers/budget.js';
import { datasetHandlers } from './handlers/datasets.js';
import { distillationHandlers } from './handlers/distillation.js';
import { metaHandlers } from './handlers/meta.js';
import { modelHandlers } from './handlers/models.js';
import { planningHandlers } from './handlers/planning.js';
import { templateHandlers } from './handlers/templates.js';
import { trainingHandlers } from './handlers/training.js';
import { trajectoryHandlers } from './handlers/trajectories.js';
import { webhookHandlers } from './handlers/webhooks.js';
import { workerHandlers } from './handlers/workers.js';
import { type InjectedFailure, type RouteInfo, Router } from './router.js';
import {
  type AdvanceTarget,
  advanceDistillationJob,
  advanceTrainingJob,
  tickDistillationJob,
  tickTrainingJob,
} from './simulate.js';
import { createState, type MockState, type OperationId } from './state.js';

export { DEFAULT_TOTAL_STEPS } from './handlers/training.js';
export type { InjectedFailure, RouteInfo } from './router.js';
export type { AdvanceTarget } from './simulate.js';
export type {
  IdempotentResult,
  Lease,
  MockState,
  OperationId,
  RecordedRequest,
  StoredBytes,
} from './state.js';

export interface TuneryMockOptions {
  /** Where the handlers listen. Default: `TUNERY_BASE_URL`, else `http://127.0.0.1:8000` (as the client). */
  baseURL?: string | undefined;
  /**
   * After each GET of an unfinished job answers, the job moves one tick forward (pending → running →
   * … → completed), so that `waitForCompletion` finishes without the test driving it. Default false.
   */
  autoAdvance?: boolean | undefined;
  /** Training steps per tick. Default 20 (a default 60-step job completes on the fourth poll). */
  stepsPerTick?: number | undefined;
  /** When set, user endpoints answer 401 without `Authorization: Bearer <apiKey>`. */
  apiKey?: string | undefined;
  /** When set, worker endpoints answer 401 without `Authorization: Bearer <workerToken>`. */
  workerToken?: string | undefined;
  /** The tenant every object belongs to. Default `default`. */
  tenantId?: string | undefined;
}

type Job = components['schemas']['TrainingJob'] | components['schemas']['DistillationJob'];

export interface TuneryMock {
  /** Pass to msw: `setupServer(...mock.handlers)` or `setupWorker(...mock.handlers)`. */
  handlers: HttpHandler[];
  /** The fake's data; read it in assertions, edit it to set up a scene. */
  state: MockState;
  /** Every operation the handlers answer, with its method and path. */
  routes: RouteInfo[];
  /**
   * Moves a training or distillation job: to a status (`running`, `completed`, `failed`, `cancelled`),
   * to a phase (`evaluating`, `curation`, `done`…), or, for training jobs, to `{ step: n }`.
   */
  advanceJob(jobId: string, to: AdvanceTarget): Job;
  /** Moves a job one tick, as one poll does with `autoAdvance`. */
  tickJob(jobId: string): Job;
  /**
   * Makes the next `times` (default 1) calls of `operationId` fail with `status` (or 'network' for a
   * connection error): e.g. `failNext('createTrainingJob', 429, { headers: { 'Retry-After': '1' } })`.
   */
  failNext(operationId: OperationId, status: InjectedFailure['status'], init?: FailNextInit): void;
  /** Forgets all data and queued failures (handlers stay valid). */
  reset(): void;
}

export interface FailNextInit extends Omit<InjectedFailure, 'status'> {
  /** How many consecutive calls fail. Default 1. */
  times?: number;
}

export function createTuneryMock(options: TuneryMockOptions = {}): TuneryMock {
  const baseURL = (options.baseURL ?? envBaseURL() ?? 'http://127.0.0.1:8000').replace(/\/+$/, '');
  const state = createState(options.tenantId);
  const failures = new Map<OperationId, InjectedFailure[]>();
  const router = new Router({
    baseURL,
    state,
    failures,
    apiKey: options.apiKey,
    workerToken: options.workerToken,
  });
  const ctx: MockContext = {
    state,
    router,
    settings: { stepsPerTick: options.stepsPerTick ?? 20 },
    autoAdvance: options.autoAdvance ?? false,
  };
  for (const register of [
    metaHandlers,
    distillationHandlers,
    trainingHandlers,
    templateHandlers,
    planningHandlers,
    datasetHandlers,
    trajectoryHandlers,
    webhookHandlers,
    adapterHandlers,
    modelHandlers,
    budgetHandlers,
    adminHandlers,
    workerHandlers,
  ]) {
    register(ctx);
  }

  const findJob = (jobId: string): Job => {
    const job = state.trainingJobs.get(jobId) ?? state.distillationJobs.get(jobId);
    if (!job) throw new Error(`The mock has no job ${jobId}.`);
    return job;
  };

  return {
    handlers: router.handlers,
    state,
    routes: router.routes,
    advanceJob(jobId, to) {
      const job = findJob(jobId);
      if ('job_id' in job) advanceTrainingJob(state, job, to);
      else advanceDistillationJob(state, job, to);
      return job;
    },
    tickJob(jobId) {
      const job = findJob(jobId);
      if ('job_id' in job) tickTrainingJob(state, job, ctx.settings);
      else tickDistillationJob(state, job);
      return job;
    },
    failNext(operationId, status, { times = 1, ...init } = {}) {
      const queue = failures.get(operationId) ?? [];
      for (let i = 0; i < times; i++) queue.push({ status, ...init });
      failures.set(operationId, queue);
    },
    reset() {
      Object.assign(state, createState(options.tenantId));
      failures.clear();
    },
  };
}

/** What a `mockHandler` resolver gets: the request and the path parameters by name. */
export interface MockHandlerInfo {
  request: Request;
  params: Record<string, string>;
}

/** A resolver's answer: the operation's success body (checked by the compiler), or any Response. */
export type MockHandlerResolver<Op extends OperationId> = (
  info: MockHandlerInfo,
) => ResponseOf<Op> | Response | Promise<ResponseOf<Op> | Response>;

export interface MockHandlerOptions {
  /** Where the handler listens. Default as `createTuneryMock`. */
  baseURL?: string | undefined;
  /** Status of a body the resolver returns. Default 200. */
  status?: number | undefined;
}

let specRoutes: RouteInfo[] | undefined;

/**
 * An msw handler for one operation, by its operationId, whose resolver must return that operation's
 * response body: to override one answer of the mock (or of a real server) in a test.
 *
 * ```ts
 * server.use(mockHandler('getTrainingJob', ({ params }) => ({ ...job, id: params.job_id!, status: 'failed' })));
 * ```
 */
export function mockHandler<Op extends OperationId>(
  operationId: Op,
  resolve: MockHandlerResolver<Op>,
  options: MockHandlerOptions = {},
): HttpHandler {
  specRoutes ??= createTuneryMock().routes;
  const route = specRoutes.find((r) => r.operationId === operationId);
  if (!route) throw new Error(`No operation ${operationId} in the Tunery API.`);
  const baseURL = (options.baseURL ?? envBaseURL() ?? 'http://127.0.0.1:8000').replace(/\/+$/, '');
  const url = baseURL + route.path.replace(/\{(\w+)\}/g, ':$1');
  return http[route.method](url, async ({ request, params }) => {
    const answer = await resolve({ request, params: params as Record<string, string> });
    return answer instanceof Response
      ? answer
      : HttpResponse.json(answer as object, { status: options.status ?? 200 });
  });
}

function envBaseURL(): string | undefined {
  const env = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process?.env;
  return env?.TUNERY_BASE_URL?.trim() || undefined;
}
