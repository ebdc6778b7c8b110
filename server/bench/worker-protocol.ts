/**
 * 2 · Worker protocol: claims+completes per second over HTTP. 16 pollers drain a pre-enqueued
 * batch, each looping `POST /v1/workers/claim` (wait_seconds 0) → `POST …/jobs/{id}/complete` with
 * the lease token, until a claim answers 204, after `warmupJobs` untimed jobs drained the same way
 * (a server's first thousand answers build its caches and compile its hot code: the rate is its
 * steady state's, and the warm-up's own rate is printed beside it). Reports the rate, claim latency
 * p50/p99, the CPU per job of the load generator, the server and Postgres, the machine's idle share
 * (process-cpu.ts), and checks that every job was claimed exactly once (client side) and ended
 * `completed` (server side).
 *
 * On Postgres the same run adds its peers, each on its own scratch database on the same server and
 * each alone while it runs: the HTTP claim toy (serve-toy-queue.ts: node:http + pg, 2 prepared
 * statements per job), drained by the very same client loop once before Tunery and once after (the
 * row shows the mean); as a reference, the same toy writing the records Tunery keeps of each job
 * (`--records`: attempt, events, adapter and model rows), drained before and after too, which splits
 * the gap into what those records cost and what the rest of Tunery costs; then graphile-worker 0.17
 * (drain-graphile.ts: no HTTP, a no-op task in-process) at its defaults and batched, as a reference.
 * The targets printed are issue 12's; a ratio below one is printed, not a failure.
 */
import { Agent, request } from 'node:http';
import { withServed } from './children.js';
import type { GraphileResult } from './drain-graphile.js';
import { cpuPer, idleShareSince, postgresCpuMicros, processCpuMicros } from './process-cpu.js';
import type { ToyInfo } from './serve-toy-queue.js';
import type { TuneryInfo } from './serve-tunery.js';
import { percentile, ratio } from './stats.js';
import { formatNumber, type Measured, type Row } from './table.js';

export interface QueueOptions {
  /** How many jobs each queue holds for the timed part (the warm-up's come on top). */
  jobs: number;
  /** Jobs drained first, untimed, by the same pollers (each server's first answers compile its code). */
  warmupJobs: number;
  pollers: number;
  /** Stop the pollers after this long even if the queue is not drained. */
  maxSeconds: number;
}

/** Issue 12's bar for Tunery against the toy (jobs/s) and for its claim p99. */
const TARGET = { toyRatio: 0.8, claimP99Ms: 50 };

/** A queue that speaks Tunery's worker protocol over HTTP: Tunery itself, or the toy. */
interface HttpQueue {
  url: string;
  token: string;
  /** Every job that should be drained. */
  pending: string[];
  /** How many jobs the server holds in `status` (for the exactly-once check). */
  count(status: 'pending' | 'running' | 'completed'): Promise<number>;
  /** The server's process, whose CPU per job the drain reports. */
  pid: number;
  /** Whether its database is the Postgres server (also reported), not one inside its own process. */
  onPostgres: boolean;
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

interface Answer {
  status: number;
  text: string;
}

/**
 * One POST over `agent`'s kept-alive sockets. node:http rather than fetch: undici's fetch costs the
 * load generator about twice the CPU per request, and on a 2-core machine the client's CPU is
 * taken from the servers under test.
 */
export function post(agent: Agent, url: string, token: string, body: unknown): Promise<Answer> {
  const payload = JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = request(
      url,
      {
        method: 'POST',
        agent,
        headers: {
          authorization: `Bearer ${token}`,
          'content-type': 'application/json',
          'content-length': Buffer.byteLength(payload),
          accept: 'application/json',
        },
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          text += chunk;
        });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text }));
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(payload);
  });
}

function tuneryQueue(info: TuneryInfo): HttpQueue {
  return {
    url: info.url,
    token: info.workerToken,
    pending: info.pending,
    pid: info.pid,
    onPostgres: info.db === 'postgres',
    async count(status) {
      const res = await fetch(`${info.url}/v1/training/jobs?status=${status}&limit=1`, {
        headers: { authorization: `Bearer ${info.apiKey}` },
      });
      if (!res.ok) throw new Error(`GET /v1/training/jobs?status=${status} answered ${res.status}`);
      return ((await res.json()) as { total: number }).total;
    },
  };
}

function toyQueue(info: ToyInfo): HttpQueue {
  return {
    url: info.url,
    token: info.token,
    pending: info.pending,
    pid: info.pid,
    onPostgres: true,
    async count(status) {
      const res = await fetch(`${info.url}/counts`, { headers: { authorization: `Bearer ${info.token}` } });
      if (!res.ok) throw new Error(`toy GET /counts answered ${res.status}`);
      return ((await res.json()) as Record<string, number>)[status] ?? 0;
    },
  };
}

/** One drain of one queue by the pollers, with its checks. */
interface Drained {
  jobsPerSecond: number;
  /** The untimed warm-up's rate, for the record: how far the first answers are from the steady state. */
  warmupJobsPerSecond: number;
  claimP50: number;
  claimP99: number;
  /** The bench process's CPU (user + system) during the drain, per completed job. */
  clientCpuMicrosPerJob: number;
  /** The same CPU as a share of one core over the drain: near 1, the client is the bottleneck. */
  clientCoreShare: number;
  /** The server's process and (when it uses one) the Postgres server's: CPU per job; unread without /proc. */
  serverCpuMicrosPerJob?: number;
  postgresCpuMicrosPerJob?: number;
  /** The share of the machine's CPU (all cores) left idle during the drain; unread without /proc. */
  machineIdleShare?: number;
  /** One phrase: the exactly-once check's outcome. */
  check: string;
  ok: boolean;
  data: Record<string, unknown>;
}

/** 16 pollers (opts.pollers) loop claim → complete on `queue` until a claim answers 204. */
async function drain(queue: HttpQueue, opts: QueueOptions): Promise<Drained> {
  const claims = new Map<string, number>();
  const claimMs: number[] = [];
  let completed = 0;
  let timedOut = false;
  // The first poller to fail stops the others at their next claim; its error fails the measurement.
  let failure: unknown;
  // One kept-alive socket per poller, as each worker would hold its own.
  const agent = new Agent({ keepAlive: true, maxSockets: opts.pollers });

  /** One claim → complete as worker `i`; false when the queue is empty. */
  const cycle = async (i: number): Promise<boolean> => {
    const claimBody = {
      worker_id: `bench-worker-${i}`,
      capabilities: { job_types: ['finetune'], methods: ['lora'], device: 'cpu', memory_gb: 16 },
      wait_seconds: 0,
    };
    const started = performance.now();
    const res = await post(agent, `${queue.url}/v1/workers/claim`, queue.token, claimBody);
    if (res.status === 204) return false;
    if (res.status !== 200) throw new Error(`claim answered ${res.status}: ${res.text}`);
    const { job } = JSON.parse(res.text) as { job: { job_id: string; lease_token: string } };
    claimMs.push(performance.now() - started);
    claims.set(job.job_id, (claims.get(job.job_id) ?? 0) + 1);

    const done = await post(agent, `${queue.url}/v1/workers/jobs/${job.job_id}/complete`, queue.token, {
      lease_token: job.lease_token,
      result: RESULT,
    });
    const answer = JSON.parse(done.text) as { status?: string };
    if (done.status !== 200 || answer.status !== 'completed') {
      throw new Error(`complete answered ${done.status}: ${done.text}`);
    }
    completed++;
    return true;
  };

  /** Each poller loops claim → complete until `enough()` or a claim answers 204; an error stops all. */
  const runPollers = (enough: () => boolean) =>
    Promise.all(
      Array.from({ length: opts.pollers }, async (_, i) => {
        try {
          while (failure === undefined && !enough()) if (!(await cycle(i))) return; // drained
        } catch (err) {
          failure ??= err;
        }
      }),
    );

  // Warm-up, not timed (its jobs are in the exactly-once check): each server's first answers build
  // what it caches and compile its hot code, which is not its rate.
  const warmupStarted = performance.now();
  await runPollers(() => completed >= opts.warmupJobs);
  const warmupJobsPerSecond = completed / ((performance.now() - warmupStarted) / 1000);
  const warmedUp = completed;
  claimMs.length = 0;
  const deadline = performance.now() + opts.maxSeconds * 1000;
  const pastDeadline = () => {
    timedOut ||= performance.now() >= deadline;
    return timedOut;
  };

  const cpuBefore = process.cpuUsage();
  const serverCpu = cpuPer(() => processCpuMicros(queue.pid));
  const postgresCpu = cpuPer(postgresCpuMicros);
  const idleShare = idleShareSince();
  const started = performance.now();
  await runPollers(pastDeadline);
  const seconds = (performance.now() - started) / 1000;
  const cpu = process.cpuUsage(cpuBefore);
  const timed = completed - warmedUp;
  const serverCpuMicrosPerJob = serverCpu(timed);
  const postgresCpuMicrosPerJob = queue.onPostgres ? postgresCpu(timed) : undefined;
  const machineIdleShare = idleShare();
  agent.destroy();
  if (failure) throw failure;

  const expected = new Set(queue.pending);
  const twice = [...claims.values()].filter((n) => n > 1).length;
  const unexpected = [...claims.keys()].filter((id) => !expected.has(id)).length;
  const missing = [...expected].filter((id) => !claims.has(id)).length;
  const exactlyOnce = [...expected].filter((id) => claims.get(id) === 1).length;
  const serverCompleted = await queue.count('completed');
  const leftOver = (await queue.count('pending')) + (await queue.count('running'));
  const exact = twice === 0 && unexpected === 0 && serverCompleted === completed;
  const ok = exact && !timedOut && exactlyOnce === expected.size && serverCompleted === expected.size;
  const check = ok
    ? `${exactlyOnce}/${expected.size} jobs claimed exactly once, all completed`
    : timedOut && exact
      ? `TIME CAP: ${completed}/${expected.size} jobs done in ${opts.maxSeconds} s, each claimed once`
      : `CHECK FAILED: ${exactlyOnce}/${expected.size} claimed once, ${twice} twice, ${missing} never, ` +
        `${unexpected} unexpected; server: ${serverCompleted} completed, ${leftOver} pending/running`;
  const clientCpuMicrosPerJob = (cpu.user + cpu.system) / Math.max(1, timed);
  const clientCoreShare = (cpu.user + cpu.system) / 1e6 / seconds;
  const claimP50 = percentile(claimMs, 50);
  const claimP99 = percentile(claimMs, 99);
  return {
    jobsPerSecond: timed / seconds,
    warmupJobsPerSecond,
    claimP50,
    claimP99,
    clientCpuMicrosPerJob,
    clientCoreShare,
    serverCpuMicrosPerJob,
    postgresCpuMicrosPerJob,
    machineIdleShare,
    check,
    ok,
    data: {
      jobs: expected.size,
      completed,
      seconds,
      warmup_jobs: warmedUp,
      warmup_jobs_per_second: warmupJobsPerSecond,
      timed_out: timedOut,
      claim_p50_ms: claimP50,
      claim_p99_ms: claimP99,
      client_cpu_us_per_job: clientCpuMicrosPerJob,
      client_core_share: clientCoreShare,
      server_cpu_us_per_job: serverCpuMicrosPerJob ?? null,
      postgres_cpu_us_per_job: postgresCpuMicrosPerJob ?? null,
      machine_idle_share: machineIdleShare ?? null,
      exactly_once: exactlyOnce,
      claimed_twice: twice,
      missing,
      unexpected,
      server_completed: serverCompleted,
      server_left_over: leftOver,
    },
  };
}

/** A peer that could not run (or whose check failed) keeps Tunery's figures and says why. */
interface Peer<T> {
  result?: T;
  error?: string;
}

async function attempt<T>(run: () => Promise<T>): Promise<Peer<T>> {
  try {
    return { result: await run() };
  } catch (err) {
    return { error: (err instanceof Error ? err.message : String(err)).split('\n')[0]!.slice(0, 160) };
  }
}

/** Several drains of one peer as one: each figure their mean; failed if any failed. */
function meanOf(runs: Peer<Drained>[]): Peer<Drained> & { rates?: number[] } {
  const failed = runs.find((run) => !run.result);
  if (failed) return failed;
  const drains = runs.map((run) => run.result!);
  const mean = (pick: (d: Drained) => number) => drains.reduce((sum, d) => sum + pick(d), 0) / drains.length;
  const notOk = drains.find((d) => !d.ok);
  return {
    rates: drains.map((d) => d.jobsPerSecond),
    result: {
      jobsPerSecond: mean((d) => d.jobsPerSecond),
      warmupJobsPerSecond: mean((d) => d.warmupJobsPerSecond),
      claimP50: mean((d) => d.claimP50),
      claimP99: mean((d) => d.claimP99),
      clientCpuMicrosPerJob: mean((d) => d.clientCpuMicrosPerJob),
      clientCoreShare: mean((d) => d.clientCoreShare),
      serverCpuMicrosPerJob: meanOfKnown(drains.map((d) => d.serverCpuMicrosPerJob)),
      postgresCpuMicrosPerJob: meanOfKnown(drains.map((d) => d.postgresCpuMicrosPerJob)),
      machineIdleShare: meanOfKnown(drains.map((d) => d.machineIdleShare)),
      check: notOk?.check ?? drains[0]!.check,
      ok: !notOk,
      data: {},
    },
  };
}

/** The mean of figures every drain has; undefined if one lacks it. */
function meanOfKnown(values: (number | undefined)[]): number | undefined {
  if (values.some((v) => v === undefined)) return undefined;
  return (values as number[]).reduce((sum, v) => sum + v, 0) / values.length;
}

/**
 * CPU per job of each party (the load generator, and where read, the server and Postgres), and how
 * much of the machine was left idle.
 */
const cpuNote = (d: Drained) =>
  [
    `client ${Math.round(d.clientCpuMicrosPerJob)} µs CPU/job (${Math.round(d.clientCoreShare * 100)}% of a core)`,
    ...(d.serverCpuMicrosPerJob === undefined ? [] : [`server ${Math.round(d.serverCpuMicrosPerJob)} µs`]),
    ...(d.postgresCpuMicrosPerJob === undefined
      ? []
      : [`Postgres ${Math.round(d.postgresCpuMicrosPerJob)} µs`]),
    ...(d.machineIdleShare === undefined ? [] : [`machine ${Math.round(d.machineIdleShare * 100)}% idle`]),
  ].join(', ');

/** The warm-up's rates, which a steady-state rate leaves out. */
const warmupNote = (tunery: Drained, toy?: Drained) =>
  `warm-up at ${formatNumber(tunery.warmupJobsPerSecond)} jobs/s` +
  (toy ? `, the toy's at ${formatNumber(toy.warmupJobsPerSecond)}` : '');

function graphileOk(g: GraphileResult): boolean {
  return g.completed === g.jobs && g.ranTwice === 0 && g.neverRan === 0 && g.leftInQueue === 0;
}

/** What each graphile-worker variant (drain-graphile.ts --variant) changes from the defaults. */
const GRAPHILE_VARIANTS = ['default', 'batched'] as const;
const GRAPHILE_SETTINGS: Record<(typeof GRAPHILE_VARIANTS)[number], string> = {
  default: 'its defaults (1 job at a time)',
  batched: '16 jobs at a time, local queue of 64, completions batched',
};

function graphileRow(
  what: string,
  tunery: Drained,
  label: (typeof GRAPHILE_VARIANTS)[number],
  peer: Peer<GraphileResult>,
): Row {
  const g = peer.result;
  const check = !g
    ? `FAILED: ${peer.error}`
    : graphileOk(g)
      ? `${g.jobs} jobs ran once each, queue empty`
      : `CHECK FAILED: ${g.completed}/${g.jobs} completed, ${g.ranTwice} twice, ${g.neverRan} never, ` +
        `${g.leftInQueue} left`;
  return {
    section: 2,
    measurement: `${what} vs graphile-worker ${label} · jobs/s`,
    tunery: tunery.jobsPerSecond,
    peer: g ? g.jobs / g.seconds : null,
    peerName: `graphile-worker 0.17, ${label}`,
    ratio: g ? ratio(tunery.jobsPerSecond, g.jobs / g.seconds) : null,
    notes:
      `reference, no HTTP: a no-op task in the worker's process, jobs added in one addJobs; ` +
      `${GRAPHILE_SETTINGS[label]}; ${check}` +
      (g ? `; its process ${Math.round(g.cpuMicrosPerJob)} µs CPU/job` : ''),
  };
}

/** A toy drained before and after Tunery, as one (meanOf). */
type ToyDrains = Peer<Drained> & { rates?: number[] };

/** The toy's figures in a row's notes: the rates it averages, its check, its CPU; or why it failed. */
const toyNote = (name: string, toy: ToyDrains) =>
  toy.result
    ? `${name} (mean of ${toy.rates?.map((r) => formatNumber(r)).join(' and ')} jobs/s, drained before and after): ` +
      `${toy.result.ok ? 'same check held' : toy.result.check}, ${cpuNote(toy.result)}`
    : `${name} FAILED: ${toy.error}`;

/** The reference row of the toy that writes Tunery's records (serve-toy-queue.ts `--records`). */
function recordsToyRow(what: string, tunery: Drained, toy: ToyDrains, recorded: ToyDrains): Row {
  const peer = recorded.result;
  const cost = peer && toy.result ? ratio(peer.jobsPerSecond, toy.result.jobsPerSecond) : null;
  return {
    section: 2,
    measurement: `${what} vs HTTP claim toy writing Tunery's records · jobs/s`,
    tunery: tunery.jobsPerSecond,
    peer: peer?.jobsPerSecond ?? null,
    peerName: "HTTP claim toy + Tunery's records",
    ratio: peer ? ratio(tunery.jobsPerSecond, peer.jobsPerSecond) : null,
    notes:
      'reference: the toy also writing what Tunery records of each job (attempt row, claimed and ' +
      'completed events, adapter and model rows), in its same two statements' +
      (cost == null ? '' : `; it runs at ${cost.toFixed(2)}× the plain toy (what the records cost)`) +
      `; ${toyNote('it', recorded)}`,
  };
}

function rowsFor(
  label: string,
  opts: QueueOptions,
  tunery: Drained,
  toy?: ToyDrains,
  recordsToy?: ToyDrains,
  graphile?: Peer<GraphileResult>[],
): Row[] {
  const what = `worker claim→complete, ${label}`;
  const peer = toy?.result;
  const line = (unit: string, pick: (d: Drained) => number, notes: string): Row => ({
    section: 2,
    measurement: `${what} · ${unit}`,
    tunery: pick(tunery),
    peer: peer ? pick(peer) : null,
    peerName: peer ? 'HTTP claim toy' : null,
    ratio: peer ? ratio(pick(tunery), pick(peer)) : null,
    notes,
  });
  const rate = ratio(tunery.jobsPerSecond, peer?.jobsPerSecond);
  const rateTarget =
    rate == null ? '' : `; target ≥ ${TARGET.toyRatio}× toy${rate >= TARGET.toyRatio ? ' met' : ': BELOW'}`;
  // The targets are Postgres's (issue 12); PGlite's rows show what the embedded default costs.
  const p99Target = !toy
    ? ''
    : `target < ${TARGET.claimP99Ms} ms${tunery.claimP99 < TARGET.claimP99Ms ? ' met' : ': ABOVE'}`;
  return [
    line(
      'jobs/s',
      (d) => d.jobsPerSecond,
      `${opts.pollers} pollers, ${opts.jobs} jobs timed after ${opts.warmupJobs} untimed (${warmupNote(tunery, peer)}); ` +
        `${tunery.check}, ${cpuNote(tunery)}${toy ? `; ${toyNote('toy', toy)}` : ''}${rateTarget}`,
    ),
    line('claim p50 ms', (d) => d.claimP50, ''),
    line('claim p99 ms', (d) => d.claimP99, p99Target),
    ...(toy && recordsToy ? [recordsToyRow(what, tunery, toy, recordsToy)] : []),
    ...(graphile ?? []).map((g, i) => graphileRow(what, tunery, GRAPHILE_VARIANTS[i]!, g)),
  ];
}

/**
 * Tunery on `db` (a fresh server, the batch enqueued before the pollers start), then on Postgres
 * its peers one after another, each alone on the machine while it runs.
 */
export async function measureWorkerProtocol(
  db: string,
  label: string,
  opts: QueueOptions,
): Promise<Measured> {
  const jobs = String(opts.jobs + opts.warmupJobs);
  const postgres = db === 'postgres';
  const drainToy = (records: boolean) =>
    attempt(() =>
      withServed<ToyInfo, Drained>(
        'serve-toy-queue.ts',
        ['--jobs', jobs, ...(records ? ['--records'] : [])],
        (info) => drain(toyQueue(info), opts),
      ),
    );
  // The toys drain in seconds: once before Tunery and once after, so a drift in the machine's
  // load (other work on it) shows as a spread instead of landing on one side.
  const toyBefore = postgres ? await drainToy(false) : undefined;
  const recordsToyBefore = postgres ? await drainToy(true) : undefined;
  const tunery = await withServed<TuneryInfo, Drained>(
    'serve-tunery.ts',
    ['--db', db, '--queue', jobs],
    (info) => drain(tuneryQueue(info), opts),
  );
  if (!postgres || !toyBefore || !recordsToyBefore) {
    return { ok: tunery.ok, rows: rowsFor(label, opts, tunery), data: { ...opts, tunery: tunery.data } };
  }
  const recordsToyRuns = [recordsToyBefore, await drainToy(true)];
  const toyRuns = [toyBefore, await drainToy(false)];
  const toy = meanOf(toyRuns);
  const recordsToy = meanOf(recordsToyRuns);
  const graphile: Peer<GraphileResult>[] = [];
  for (const variant of GRAPHILE_VARIANTS) {
    graphile.push(
      await attempt(() =>
        withServed<GraphileResult, GraphileResult>(
          'drain-graphile.ts',
          ['--jobs', jobs, '--variant', variant],
          async (result) => result,
          (opts.maxSeconds + 60) * 1000,
        ),
      ),
    );
  }
  const peersOk =
    toy.result?.ok === true &&
    recordsToy.result?.ok === true &&
    graphile.every((g) => g.result !== undefined && graphileOk(g.result));
  return {
    ok: tunery.ok && peersOk,
    rows: rowsFor(label, opts, tunery, toy, recordsToy, graphile),
    data: {
      ...opts,
      tunery: tunery.data,
      toy: toyRuns.map((run) => run.result?.data ?? { error: run.error }),
      toy_with_records: recordsToyRuns.map((run) => run.result?.data ?? { error: run.error }),
      graphile: graphile.map((g) => g.result ?? { error: g.error }),
    },
  };
}
