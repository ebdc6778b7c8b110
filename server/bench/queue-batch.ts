/**
 * 2 · Worker protocol, batched and woken:
 *
 *   - batched: 16 pollers drain a pre-enqueued batch, each looping `POST /v1/workers/claim`
 *     (`max_jobs` 32, wait_seconds 0) → `POST /v1/workers/jobs/complete` with every job it got, until
 *     a claim answers 204 (after one untimed warm-up batch). Reports jobs/s and checks that every job was claimed exactly once (client
 *     side) and ended `completed` (server side).
 *   - herd: 16 workers long-poll (wait_seconds 20) on an empty queue; then the server enqueues the
 *     whole batch in one transaction (SIGUSR2, serve-tunery.ts `--enqueue-on-signal`), and the workers
 *     claim → complete one job at a time until it is drained. Reports the server's claim attempts
 *     (`tunery_claim_attempts_total` at /metrics, from the signal to the end) per job: 1 means every
 *     wake found a job; a broadcast wake-up would show up as many empty claims per signal.
 */
import { Agent } from 'node:http';
import type { TuneryInfo } from './serve-tunery.js';
import type { Measured, Row } from './table.js';
import { post as postOverAgent } from './worker-protocol.js';

export interface BatchOptions {
  pollers: number;
  /** Jobs per claim in the batched run (the spec's maximum is 32). */
  batch: number;
  /** Stop after this long even if the queue is not drained. */
  maxSeconds: number;
}

/** What a finetune worker reports on completion (docs/worker-protocol.md). */
const RESULT = {
  loss_final: 1.234,
  params_trainable: 1_638_400,
  params_before: 134_515_008,
  params_after: 134_515_008,
  train_seconds: 1.5,
  steps: 100,
  adapter: { name: 'bench-output', size_bytes: 6_553_600 },
  model: null,
};

interface Claimed {
  job_id: string;
  lease_token: string;
}

const CAPABILITIES = { job_types: ['finetune'], methods: ['lora'], device: 'cpu', memory_gb: 16 };

function post(info: TuneryInfo, path: string, body: unknown, signal?: AbortSignal): Promise<Response> {
  return fetch(`${info.url}${path}`, {
    method: 'POST',
    headers: {
      authorization: `Bearer ${info.workerToken}`,
      'content-type': 'application/json',
      accept: 'application/json',
    },
    body: JSON.stringify(body),
    signal,
  });
}

async function countByStatus(info: TuneryInfo, status: string): Promise<number> {
  const res = await fetch(`${info.url}/v1/training/jobs?status=${status}&limit=1`, {
    headers: { authorization: `Bearer ${info.apiKey}` },
  });
  if (!res.ok) throw new Error(`GET /v1/training/jobs?status=${status} answered ${res.status}`);
  return ((await res.json()) as { total: number }).total;
}

/** The server's claim attempts so far, by outcome, from /metrics. */
async function claimAttempts(info: TuneryInfo): Promise<{ claimed: number; empty: number }> {
  const text = await (await fetch(`${info.url}/metrics`)).text();
  const of = (outcome: string) => {
    const match = text.match(
      new RegExp(`^tunery_claim_attempts_total\\{outcome="${outcome}"\\} (\\S+)$`, 'm'),
    );
    return match ? Number(match[1]) : 0;
  };
  return { claimed: of('claimed'), empty: of('empty') };
}

/** Claims per job id, and what they add up to: each of `expected` claimed once and completed. */
async function exactlyOnce(
  info: TuneryInfo,
  expected: string[],
  claims: Map<string, number>,
  completed: number,
  /** Jobs outside `expected` that the run completed too. */
  others = 0,
) {
  const wanted = new Set(expected);
  const twice = [...claims.values()].filter((n) => n > 1).length;
  const unexpected = [...claims.keys()].filter((id) => !wanted.has(id)).length;
  const once = expected.filter((id) => claims.get(id) === 1).length;
  const serverCompleted = await countByStatus(info, 'completed');
  const ok =
    twice === 0 && unexpected === 0 && once === wanted.size && serverCompleted === completed + others;
  const check = ok
    ? `${once}/${wanted.size} jobs claimed exactly once, all completed`
    : `CHECK FAILED: ${once}/${wanted.size} claimed once, ${twice} twice, ${unexpected} unexpected; ` +
      `server: ${serverCompleted} completed, client: ${completed}`;
  return { ok, check, once, twice, unexpected, serverCompleted };
}

const row = (measurement: string, tunery: number, notes: string): Row => ({
  section: 2,
  measurement,
  tunery,
  peer: null,
  peerName: null,
  ratio: null,
  notes,
});

/** Runs `pollers` loops of `body` until each returns; the first error stops the others and is thrown. */
async function runPollers(count: number, body: (i: number, failed: () => boolean) => Promise<void>) {
  let failure: unknown;
  await Promise.all(
    Array.from({ length: count }, (_, i) =>
      body(i, () => failure !== undefined).catch((err) => {
        failure ??= err;
      }),
    ),
  );
  if (failure) throw failure;
}

/** The batched drain: max_jobs claims, one batched complete per claim. */
export async function measureBatchedClaims(
  info: TuneryInfo,
  dbLabel: string,
  opts: BatchOptions,
): Promise<Measured> {
  const claims = new Map<string, number>();
  let completed = 0;
  let timedOut = false;
  // One kept-alive socket per poller; node:http, whose client costs half of fetch's CPU (worker-protocol.ts)
  const agent = new Agent({ keepAlive: true, maxSockets: opts.pollers });
  const url = (path: string) => `${info.url}${path}`;

  /** One batched claim → batched complete as worker `i`; false when the queue is empty. */
  const cycle = async (i: number, maxJobs: number): Promise<boolean> => {
    const claimBody = {
      worker_id: `bench-batcher-${i}`,
      capabilities: CAPABILITIES,
      wait_seconds: 0,
      max_jobs: maxJobs,
    };
    const res = await postOverAgent(agent, url('/v1/workers/claim'), info.workerToken, claimBody);
    if (res.status === 204) return false;
    if (res.status !== 200) throw new Error(`claim answered ${res.status}: ${res.text}`);
    const { jobs } = JSON.parse(res.text) as { jobs: Claimed[] };
    for (const job of jobs) claims.set(job.job_id, (claims.get(job.job_id) ?? 0) + 1);
    const done = await postOverAgent(agent, url('/v1/workers/jobs/complete'), info.workerToken, {
      completions: jobs.map((job) => ({ job_id: job.job_id, lease_token: job.lease_token, result: RESULT })),
    });
    const answer = JSON.parse(done.text) as { results?: { status?: string }[] };
    const ok = answer.results?.filter((r) => r.status === 'completed').length ?? 0;
    if (done.status !== 200 || ok !== jobs.length) {
      throw new Error(`batched complete answered ${done.status}: ${done.text.slice(0, 300)}`);
    }
    completed += ok;
    return true;
  };

  // Warm-up, not timed (in the exactly-once check): one batch builds the server's caches.
  await cycle(0, opts.batch);
  const warmedUp = completed;
  const deadline = performance.now() + opts.maxSeconds * 1000;
  const started = performance.now();
  await runPollers(opts.pollers, async (i, failed) => {
    while (!failed()) {
      if (performance.now() >= deadline) {
        timedOut = true;
        return;
      }
      if (!(await cycle(i, opts.batch))) return; // drained
    }
  });
  agent.destroy();
  const seconds = (performance.now() - started) / 1000;
  const check = await exactlyOnce(info, info.pending, claims, completed);
  const ok = check.ok && !timedOut;
  const notes = `${opts.pollers} pollers, max_jobs ${opts.batch}; ${timedOut ? `TIME CAP ${opts.maxSeconds} s; ` : ''}${check.check}`;
  return {
    ok,
    rows: [
      row(
        `batched claim→complete (${opts.batch}), ${dbLabel} · jobs/s`,
        (completed - warmedUp) / seconds,
        notes,
      ),
    ],
    data: { ...opts, jobs: info.pending.length, completed, seconds, timed_out: timedOut, ...check },
  };
}

/**
 * The herd: long-polling workers idle, then the batch arrives in one transaction. Counts the server's
 * claim attempts from just before the signal until the batch is drained.
 */
export async function measureHerd(info: TuneryInfo, dbLabel: string, opts: BatchOptions): Promise<Measured> {
  const claims = new Map<string, number>();
  const total = info.queued.length;
  // the API-created job is pending too: claimed before the signal, it is not part of the count
  const batch = new Set(info.queued);
  let completed = 0;
  let others = 0;
  const stop = new AbortController();
  const drained = () => {
    if (completed === total) stop.abort();
  };
  const cap = setTimeout(() => stop.abort(), opts.maxSeconds * 1000);

  const workers = runPollers(opts.pollers, async (i, failed) => {
    const claimBody = { worker_id: `bench-waiter-${i}`, capabilities: CAPABILITIES, wait_seconds: 20 };
    while (!failed() && !stop.signal.aborted) {
      let res: Response;
      try {
        res = await post(info, '/v1/workers/claim', claimBody, stop.signal);
      } catch (err) {
        if (stop.signal.aborted) return; // drained: the long-polls still open are cut off
        throw err;
      }
      if (res.status === 204) continue;
      if (res.status !== 200) throw new Error(`claim answered ${res.status}: ${await res.text()}`);
      const { job } = (await res.json()) as { job: Claimed };
      const counted = batch.has(job.job_id);
      if (counted) claims.set(job.job_id, (claims.get(job.job_id) ?? 0) + 1);
      const done = await post(info, `/v1/workers/jobs/${job.job_id}/complete`, {
        lease_token: job.lease_token,
        result: RESULT,
      });
      if (done.status !== 200) throw new Error(`complete answered ${done.status}: ${await done.text()}`);
      if (counted) completed++;
      else others++;
      drained();
    }
  });

  // Idle: every worker has made its first (empty) claim and waits in line.
  while ((await claimAttempts(info)).empty < opts.pollers) await new Promise((r) => setTimeout(r, 50));
  const before = await claimAttempts(info);
  const started = performance.now();
  process.kill(info.pid, 'SIGUSR2');
  await workers;
  clearTimeout(cap);
  const seconds = (performance.now() - started) / 1000;
  const after = await claimAttempts(info);
  const claimed = after.claimed - before.claimed;
  const empty = after.empty - before.empty;
  const perJob = (claimed + empty) / Math.max(1, completed);
  const check = await exactlyOnce(info, info.queued, claims, completed, others);
  const timedOut = completed < total;
  const ok = check.ok && !timedOut && perJob <= 1.2;
  const notes =
    `${opts.pollers} long-polls idle, ${total} jobs in one transaction: ${claimed} claimed + ${empty} empty ` +
    `claim attempts (target ≤ 1.2 per job); ${completed} jobs in ${seconds.toFixed(1)} s; ` +
    `${timedOut ? `TIME CAP ${opts.maxSeconds} s; ` : ''}${check.check}`;
  return {
    ok,
    rows: [row(`herd wake-up, ${dbLabel} · claim attempts per job`, perJob, notes)],
    data: { ...opts, jobs: total, completed, seconds, claimed, empty, per_job: perJob, ...check },
  };
}
