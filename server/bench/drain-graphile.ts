/**
 * A reference for the worker-protocol benchmark: graphile-worker 0.17 (the last line that runs on
 * Node 20) draining the same number of jobs on the same Postgres server, in its own process. No
 * HTTP: the worker claims over its own pool and runs a no-op task in-process, so this is the floor
 * of a Postgres queue rather than a like-for-like peer.
 *
 * On a scratch database, in its own schema: migrates, adds `--jobs N` jobs in one `addJobs` call
 * (one statement, one transaction), then starts the runner and times from `run()` until the N-th
 * `job:complete` (the job deleted from the queue). Checks that each job ran exactly once and that
 * the queue is empty, then prints `READY {result}` (it is done by then) and exits once stopped.
 *
 *   --variant default   graphile's defaults (concurrency 1, no local queue, no completion batching)
 *   --variant batched   16 concurrent jobs, a local queue of 64, completions batched (delay 0)
 */
import { parseArgs } from 'node:util';
import { Logger, makeWorkerUtils, type RunnerOptions, run } from 'graphile-worker';
import pg from 'pg';
import { type ScratchDatabase, scratchDatabase } from './scratch-db.js';
import { stopWithParent } from './stop-with-parent.js';

export interface GraphileResult {
  variant: string;
  jobs: number;
  completed: number;
  seconds: number;
  /** Jobs the task saw more than once, or never (payload numbers). */
  ranTwice: number;
  neverRan: number;
  /** Jobs still in graphile's table after the drain (completed jobs are deleted). */
  leftInQueue: number;
  /** This process's CPU (user + system) from run() to the last completion, per job. */
  cpuMicrosPerJob: number;
  settings: Record<string, unknown>;
}

const SCHEMA = 'graphile_bench';
const TASK = 'bench_noop';
const VARIANTS: Record<string, Partial<RunnerOptions>> = {
  default: {},
  batched: {
    concurrency: 16,
    maxPoolSize: 18,
    preset: { worker: { localQueue: { size: 64 }, completeJobBatchDelay: 0 } },
  },
};

const { values } = parseArgs({
  options: { jobs: { type: 'string', default: '0' }, variant: { type: 'string', default: 'default' } },
});
const jobCount = Number(values.jobs);
const variant = values.variant ?? 'default';
const settings = VARIANTS[variant];
if (!settings) throw new Error(`drain-graphile.ts: no variant ${variant}`);

/** graphile's errors and warnings to stderr (the parent shows them if we fail); the rest is noise. */
const logger = new Logger(() => (level, message) => {
  if (level === 'error' || level === 'warning') process.stderr.write(`[graphile ${level}] ${message}\n`);
});

async function enqueue(connectionString: string): Promise<void> {
  const utils = await makeWorkerUtils({ connectionString, schema: SCHEMA, logger });
  try {
    await utils.migrate();
    await utils.addJobs(Array.from({ length: jobCount }, (_, n) => ({ identifier: TASK, payload: { n } })));
  } finally {
    await utils.release();
  }
}

async function jobsLeft(connectionString: string): Promise<number> {
  const client = new pg.Client({ connectionString });
  await client.connect();
  try {
    const { rows } = await client.query(`SELECT count(*)::int AS n FROM ${SCHEMA}._private_jobs`);
    return (rows[0] as { n: number }).n;
  } finally {
    await client.end();
  }
}

async function drain(connectionString: string): Promise<GraphileResult> {
  const runs = new Array<number>(jobCount).fill(0);
  let completed = 0;
  let allDone!: () => void;
  const done = new Promise<void>((resolve) => {
    allDone = resolve;
  });
  const cpuBefore = process.cpuUsage();
  const started = performance.now();
  const runner = await run({
    ...settings,
    connectionString,
    schema: SCHEMA,
    logger,
    noHandleSignals: true,
    crontab: '',
    taskList: {
      [TASK]: async (payload) => {
        runs[(payload as { n: number }).n]!++;
      },
    },
  });
  runner.events.on('job:complete', ({ error }) => {
    if (error === undefined || error === null) completed++;
    if (completed === jobCount) allDone();
  });
  if (jobCount > 0) await done;
  const seconds = (performance.now() - started) / 1000;
  const cpu = process.cpuUsage(cpuBefore);
  await runner.stop();
  return {
    variant,
    jobs: jobCount,
    completed,
    seconds,
    ranTwice: runs.filter((n) => n > 1).length,
    neverRan: runs.filter((n) => n === 0).length,
    leftInQueue: await jobsLeft(connectionString),
    cpuMicrosPerJob: (cpu.user + cpu.system) / Math.max(1, completed),
    settings: { concurrency: 1, ...settings },
  };
}

let scratch: ScratchDatabase | undefined;
let stopping: Promise<void> | undefined;
const shutdown = (code: number) => {
  stopping ??= (async () => {
    await scratch?.drop().catch(() => {});
    process.exit(code);
  })();
  return stopping;
};
stopWithParent(() => shutdown(0));

try {
  scratch = await scratchDatabase('tunery_bench_graphile');
  await enqueue(scratch.url);
  const result = await drain(scratch.url);
  process.stdout.write(`READY ${JSON.stringify(result)}\n`);
} catch (err) {
  process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  await shutdown(1);
}
