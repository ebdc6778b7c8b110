/**
 * 2 · Worker protocol: claims+completes per second over HTTP. 16 pollers drain a pre-enqueued
 * batch, each looping `POST /v1/workers/claim` (wait_seconds 0) → `POST …/jobs/{id}/complete` with
 * the lease token, until a claim answers 204. Reports the rate, claim latency p50/p99, and checks
 * that every job was claimed exactly once (client side) and ended `completed` (server side).
 */
import type { TuneryInfo } from './serve-tunery.js';
import { percentile } from './stats.js';
import type { Measured, Row } from './table.js';

export interface QueueOptions {
  pollers: number;
  /** Stop the pollers after this long even if the queue is not drained. */
  maxSeconds: number;
}

/** What a finetune worker reports on completion (docs/worker-protocol.md). */
const RESULT = {
  loss_final: 1.234,
  eval_loss_final: null,
  ppl_baseline: 12.5,
  ppl_final: 3.4,
  ppl_delta_pct: -72.8,
  params_trainable: 1_638_400,
  params_before: 134_515_008,
  params_after: 134_515_008,
  tokens_processed: 51_200,
  gpu_seconds: 1.5,
  train_seconds: 1.5,
  steps: 100,
  adapter: { name: 'bench-output', size_bytes: 6_553_600 },
  model: null,
};

async function post(url: string, token: string, body: unknown): Promise<Response> {
  return fetch(url, {
    method: 'POST',
    headers: {
      authorization: `Bearer ${token}`,
      'content-type': 'application/json',
      accept: 'application/json',
    },
    body: JSON.stringify(body),
  });
}

async function countByStatus(info: TuneryInfo, status: string): Promise<number> {
  const res = await fetch(`${info.url}/v1/training/jobs?status=${status}&limit=1`, {
    headers: { authorization: `Bearer ${info.apiKey}` },
  });
  if (!res.ok) throw new Error(`GET /v1/training/jobs?status=${status} answered ${res.status}`);
  return ((await res.json()) as { total: number }).total;
}

export async function measureWorkerProtocol(
  info: TuneryInfo,
  dbLabel: string,
  opts: QueueOptions,
): Promise<Measured> {
  const claims = new Map<string, number>();
  const claimMs: number[] = [];
  let completed = 0;
  let timedOut = false;
  // The first poller to fail stops the others at their next claim; its error fails the measurement.
  let failure: unknown;
  const deadline = performance.now() + opts.maxSeconds * 1000;

  const poller = async (i: number) => {
    const claimBody = {
      worker_id: `bench-worker-${i}`,
      capabilities: { job_types: ['finetune'], methods: ['lora'], device: 'cpu', memory_gb: 16 },
      wait_seconds: 0,
    };
    while (failure === undefined) {
      if (performance.now() >= deadline) {
        timedOut = true;
        return;
      }
      const started = performance.now();
      const res = await post(`${info.url}/v1/workers/claim`, info.workerToken, claimBody);
      if (res.status === 204) return; // drained
      if (res.status !== 200) throw new Error(`claim answered ${res.status}: ${await res.text()}`);
      const { job } = (await res.json()) as { job: { job_id: string; lease_token: string } };
      claimMs.push(performance.now() - started);
      claims.set(job.job_id, (claims.get(job.job_id) ?? 0) + 1);

      const done = await post(`${info.url}/v1/workers/jobs/${job.job_id}/complete`, info.workerToken, {
        lease_token: job.lease_token,
        result: RESULT,
      });
      const answer = (await done.json()) as { status?: string };
      if (done.status !== 200 || answer.status !== 'completed') {
        throw new Error(`complete answered ${done.status}: ${JSON.stringify(answer)}`);
      }
      completed++;
    }
  };

  const guarded = (i: number) =>
    poller(i).catch((err) => {
      failure ??= err;
    });
  const started = performance.now();
  await Promise.all(Array.from({ length: opts.pollers }, (_, i) => guarded(i)));
  const seconds = (performance.now() - started) / 1000;
  if (failure) throw failure;

  const expected = new Set(info.pending);
  const twice = [...claims.values()].filter((n) => n > 1).length;
  const unexpected = [...claims.keys()].filter((id) => !expected.has(id)).length;
  const missing = [...expected].filter((id) => !claims.has(id)).length;
  const exactlyOnce = [...expected].filter((id) => claims.get(id) === 1).length;
  const serverCompleted = await countByStatus(info, 'completed');
  const leftOver = (await countByStatus(info, 'pending')) + (await countByStatus(info, 'running'));
  const exact = twice === 0 && unexpected === 0 && serverCompleted === completed;
  const ok = exact && !timedOut && exactlyOnce === expected.size && serverCompleted === expected.size;
  const check = ok
    ? `${exactlyOnce}/${expected.size} jobs claimed exactly once, all completed`
    : timedOut && exact
      ? `TIME CAP: ${completed}/${expected.size} jobs done in ${opts.maxSeconds} s, each claimed once`
      : `CHECK FAILED: ${exactlyOnce}/${expected.size} claimed once, ${twice} twice, ${missing} never, ` +
        `${unexpected} unexpected; server: ${serverCompleted} completed, ${leftOver} pending/running`;

  const what = `worker claim→complete, ${dbLabel}`;
  const rows: Row[] = [
    {
      section: 2,
      measurement: `${what} · jobs/s`,
      tunery: completed / seconds,
      peer: null,
      peerName: null,
      ratio: null,
      notes: `${opts.pollers} pollers; ${check}`,
    },
    {
      section: 2,
      measurement: `${what} · claim p50 ms`,
      tunery: percentile(claimMs, 50),
      peer: null,
      peerName: null,
      ratio: null,
      notes: '',
    },
    {
      section: 2,
      measurement: `${what} · claim p99 ms`,
      tunery: percentile(claimMs, 99),
      peer: null,
      peerName: null,
      ratio: null,
      notes: '',
    },
  ];
  return {
    ok,
    rows,
    data: {
      ...opts,
      jobs: expected.size,
      completed,
      seconds,
      timed_out: timedOut,
      claim_p50_ms: percentile(claimMs, 50),
      claim_p99_ms: percentile(claimMs, 99),
      exactly_once: exactlyOnce,
      claimed_twice: twice,
      missing,
      unexpected,
      server_completed: serverCompleted,
      server_left_over: leftOver,
    },
  };
}
