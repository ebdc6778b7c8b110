/**
 * The operator's view, in Prometheus's text format at `GET /metrics`: request latency by operation,
 * the queue by status and type, workers online, serving workers and inference requests in flight,
 * lease expiries, claim attempts and upload bytes, plus Node's process metrics. One registry per
 * server (tests run several in one process). With `TUNERY_METRICS_TOKEN` set, scrapes must present it as a bearer token.
 */
import type { NextFunction, Request, Response } from 'express';
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';
import type { AppContext } from './context.js';
import { ApiError } from './errors.js';
import { WORKER_ONLINE_SECONDS } from './queue/claim.js';
import { SERVING_WORKER_SEEN_SECONDS } from './services/inference.js';

export interface Metrics {
  registry: Registry;
  requestSeconds: Histogram<'operation' | 'method' | 'status'>;
  leaseExpiries: Counter<'outcome'>;
  claimAttempts: Counter<'outcome'>;
}

export function createMetrics(ctx: Pick<AppContext, 'knex' | 'storage'>): Metrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'tunery_' });
  const requestSeconds = new Histogram({
    name: 'tunery_http_request_duration_seconds',
    help: 'API request latency by operation (claimJob is the claim latency, its long-poll wait included).',
    labelNames: ['operation', 'method', 'status'] as const,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [registry],
  });
  const leaseExpiries = new Counter({
    name: 'tunery_lease_expiries_total',
    help: 'Running jobs whose lease lapsed, by what the sweeper did with them.',
    labelNames: ['outcome'] as const,
    registers: [registry],
  });
  const claimAttempts = new Counter({
    name: 'tunery_claim_attempts_total',
    help: 'Claim attempts (each long-poll wake makes one; claims that arrive together share a statement), by whether they leased a job: attempts per job near 1 means no thundering herd.',
    labelNames: ['outcome'] as const,
    registers: [registry],
  });
  new Counter({
    name: 'tunery_upload_bytes_total',
    help: 'Bytes received by uploads (datasets, checkpoints, outputs) since the server started.',
    registers: [registry],
    collect() {
      this.reset();
      this.inc(ctx.storage.bytesReceived);
    },
  });
  new Gauge({
    name: 'tunery_jobs',
    help: 'Jobs by status and type.',
    labelNames: ['status', 'type'] as const,
    registers: [registry],
    async collect() {
      const rows = await ctx
        .knex('jobs')
        .select('status', 'type')
        .count({ n: '*' })
        .groupBy('status', 'type');
      this.reset();
      for (const r of rows as { status: string; type: string; n: number | string }[]) {
        this.set({ status: r.status, type: r.type }, Number(r.n));
      }
    },
  });
  const countOf = async (sql: string) => Number((await ctx.knex.raw(sql)).rows[0]?.n ?? 0);
  new Gauge({
    name: 'tunery_workers_online',
    help: `Training workers that claimed or heartbeat within ${WORKER_ONLINE_SECONDS} s.`,
    registers: [registry],
    async collect() {
      this.set(
        await countOf(
          `SELECT count(*)::int AS n FROM workers WHERE last_seen_at > now() - make_interval(secs => ${WORKER_ONLINE_SECONDS})`,
        ),
      );
    },
  });
  new Gauge({
    name: 'tunery_serving_workers_online',
    help: `Serving workers that claimed or reported within ${SERVING_WORKER_SEEN_SECONDS} s.`,
    registers: [registry],
    async collect() {
      this.set(
        await countOf(
          `SELECT count(*)::int AS n FROM serving_workers WHERE last_seen_at > now() - make_interval(secs => ${SERVING_WORKER_SEEN_SECONDS})`,
        ),
      );
    },
  });
  new Gauge({
    name: 'tunery_inference_requests_in_flight',
    help: 'Inference requests waiting for or being answered by a serving worker.',
    registers: [registry],
    async collect() {
      this.set(await countOf('SELECT count(*)::int AS n FROM inference_requests'));
    },
  });
  return { registry, requestSeconds, leaseExpiries, claimAttempts };
}

/** Times a route's requests into `tunery_http_request_duration_seconds`, labelled with its operationId. */
export function timeOperation(metrics: Metrics, operation: string) {
  return (req: Request, res: Response, next: NextFunction) => {
    const end = metrics.requestSeconds.startTimer({ operation, method: req.method });
    res.once('finish', () => end({ status: String(res.statusCode) }));
    next();
  };
}

/** `GET /metrics`: the text format; `401` without the token when TUNERY_METRICS_TOKEN is set. */
export function metricsRoute(ctx: AppContext) {
  return async (req: Request, res: Response, next: NextFunction) => {
    try {
      const token = ctx.config.metricsToken;
      if (token && req.get('authorization') !== `Bearer ${token}`) {
        throw new ApiError(401, 'unauthorized', 'Missing or invalid metrics token.');
      }
      res.type(ctx.metrics.registry.contentType).send(await ctx.metrics.registry.metrics());
    } catch (err) {
      next(err);
    }
  };
}
