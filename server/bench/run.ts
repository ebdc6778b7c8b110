/**
 * `pnpm bench`: six measurements in one run, printed as one table (then one `BENCH_JSON` line).
 *
 *   1. server: GET /v1/training/jobs/{id} on the full app vs a bare Express route (PGlite; also
 *      Postgres when DATABASE_URL is set — on a scratch database created and dropped there);
 *   2. worker protocol: claim → complete per second with 16 pollers, exactly-once checked, the
 *      load generator's CPU per job; on Postgres beside a minimal HTTP claim toy (same client
 *      loop), the toy writing Tunery's records of each job and graphile-worker 0.17 (no HTTP)
 *      as references; the same batched (max_jobs 32,
 *      batched completes); and the herd: 16 idle long-polls, then the whole batch enqueued in one
 *      transaction, claim attempts per job from the server's /metrics;
 *   3. SDK: tunery.training.jobs.retrieve vs raw fetch, per call;
 *   4. CPU training: the worker's LoRA loop vs a plain transformers+peft loop (Python);
 *   5. inference relay: a chat completion through a serving worker vs a plain request;
 *   6. serving overhead: chat completions of a tiny model through Tunery and a real serving worker
 *      vs the same backend called in-process (time to first text, tokens/s).
 *
 * Every server runs in its own child process and is killed at the end, whatever happens; all
 * traffic is on 127.0.0.1. Progress goes to stderr; the table and the JSON line to stdout; the
 * exit code is 1 when a measurement failed or a check did not hold.
 *
 *   --quick      shorter everything, to check the harness (its figures mean little)
 *   --only 2,4   just those measurements
 *   BENCH_LOG_LEVEL=error   the servers' error logs on stderr
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { measureChatOverhead } from './chat-overhead.js';
import { type Served, serve, stopAll } from './children.js';
import { measureInferenceRelay } from './inference-relay.js';
import { measureBatchedClaims, measureHerd } from './queue-batch.js';
import { measureSdkOverhead } from './sdk-overhead.js';
import type { BareInfo } from './serve-bare.js';
import type { TuneryInfo } from './serve-tunery.js';
import { measureGetJob } from './server-throughput.js';
import { failedRow, jsonLine, type Measured, type Row, renderTable } from './table.js';
import { measureTraining } from './training-throughput.js';
import { measureWorkerProtocol } from './worker-protocol.js';

const { values: flags } = parseArgs({
  options: { quick: { type: 'boolean', default: false }, only: { type: 'string' } },
});
const quick = flags.quick;
/** `--only 2,4`: just those measurements. */
const wanted = new Set((flags.only ?? '1,2,3,4,5,6').split(',').map(Number));
const LOAD = { connections: 16, seconds: quick ? 1 : 5, warmupSeconds: 1, repeats: quick ? 1 : 3 };
const QUEUE = { jobs: quick ? 200 : 2000, warmupJobs: quick ? 50 : 1000, pollers: 16, maxSeconds: 60 };
const BATCHED = { pollers: 16, batch: 32, maxSeconds: 60 };
const SDK = quick ? { calls: 200, rounds: 4, warmup: 50 } : { calls: 2000, rounds: 20, warmup: 200 };
const TRAINING = { steps: quick ? 8 : 32, timeoutSeconds: 240 };
const RELAY = quick ? { requests: 50, warmup: 10 } : { requests: 500, warmup: 50 };
const CHAT = quick ? { requests: 5, warmup: 2, maxTokens: 16 } : { requests: 30, warmup: 3, maxTokens: 32 };

const SDK_ROW = 'SDK training.jobs.retrieve';

const databases = [
  { db: 'pglite', label: 'PGlite' },
  ...(process.env.DATABASE_URL ? [{ db: 'postgres', label: 'Postgres' }] : []),
] as const;

const rows: Row[] = [];
const results: Record<string, unknown> = {};
let failed = false;
const log = (text: string) => process.stderr.write(`${text}\n`);

/** Runs one measurement; a failure becomes a FAILED line in the table instead of ending the run. */
async function measure(section: number, name: string, key: string, run: () => Promise<Measured>) {
  if (!wanted.has(section)) return;
  const started = performance.now();
  log(`[bench] ${name} …`);
  try {
    const measured = await run();
    rows.push(...measured.rows);
    results[key] = measured.data;
    if (measured.ok === false) failed = true;
  } catch (err) {
    rows.push(failedRow(section, name, err));
    results[key] = { error: err instanceof Error ? err.message : String(err) };
    failed = true;
  }
  log(`[bench]   ${((performance.now() - started) / 1000).toFixed(1)} s`);
}

/** Starts a Tunery server process, runs `body` against it, and stops it whatever happens. */
async function withTunery<T>(args: string[], body: (info: TuneryInfo) => Promise<T>): Promise<T> {
  const server = await serve<TuneryInfo>('serve-tunery.ts', args);
  try {
    return await body(server.info);
  } finally {
    await server.stop();
  }
}

/** Starts the bare peer, answering with `body` (handed over in a file that is gone once it listens). */
async function serveBare(body: string): Promise<Served<BareInfo>> {
  const dir = await mkdtemp(join(tmpdir(), 'tunery-bench-body-'));
  try {
    await writeFile(join(dir, 'job.json'), body);
    return await serve<BareInfo>('serve-bare.ts', ['--body', join(dir, 'job.json')]);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

const startedAt = new Date();
const loadBefore = loadavg()[0]!;
let bare: Served<BareInfo> | undefined;
try {
  // 1 and 3: one Tunery server per database (plus the bare peer, started once with Tunery's body).
  for (const { db, label } of databases) {
    const getJob = `GET /v1/training/jobs/{id}, ${label}`;
    // The SDK's overhead is the client's: measured once, on the PGlite server while it is up.
    const withSdk = db === 'pglite' && wanted.has(3);
    if (!wanted.has(1) && !withSdk) continue;
    try {
      await withTunery(['--db', db], async (info) => {
        await measure(1, getJob, `server_${db}`, async () => {
          const res = await fetch(`${info.url}/v1/training/jobs/${info.jobId}`, {
            headers: { authorization: `Bearer ${info.apiKey}` },
          });
          const body = await res.text();
          if (res.status !== 200) throw new Error(`GET job answered ${res.status}: ${body.slice(0, 200)}`);
          bare ??= await serveBare(body);
          return measureGetJob(
            { tunery: res.url, bare: `${bare.info.url}/v1/training/jobs/${info.jobId}`, apiKey: info.apiKey },
            { ...LOAD, dbLabel: label, bodyBytes: Buffer.byteLength(body) },
          );
        });
        if (withSdk) await measure(3, SDK_ROW, 'sdk', () => measureSdkOverhead(info, SDK));
      });
    } catch (err) {
      // The server itself did not start: every line that needed it says so.
      if (wanted.has(1)) rows.push(failedRow(1, getJob, err));
      if (withSdk) rows.push(failedRow(3, SDK_ROW, err));
      failed = true;
    }
  }
  await bare?.stop();

  // 2: a fresh server per database, with the batch enqueued before the pollers start; on Postgres
  // also its peers (worker-protocol.ts), each alone in turn.
  for (const { db, label } of databases) {
    await measure(2, `worker claim→complete, ${label}`, `worker_protocol_${db}`, () =>
      measureWorkerProtocol(db, label, QUEUE),
    );
    await measure(2, `batched claim→complete, ${label}`, `queue_batched_${db}`, () =>
      withTunery(['--db', db, '--queue', String(QUEUE.jobs)], (info) =>
        measureBatchedClaims(info, label, BATCHED),
      ),
    );
    await measure(2, `herd wake-up, ${label}`, `queue_herd_${db}`, () =>
      withTunery(['--db', db, '--queue', String(QUEUE.jobs), '--enqueue-on-signal'], (info) =>
        measureHerd(info, label, BATCHED),
      ),
    );
  }

  // 5: the inference relay, a fresh server per database.
  for (const { db, label } of databases) {
    await measure(5, `chat completion via relay, ${label}`, `inference_relay_${db}`, () =>
      withTunery(['--db', db], (info) => measureInferenceRelay(info, label, RELAY)),
    );
  }

  // 6: a real serving worker on a tiny model, against its backend in-process.
  await measure(6, 'chat completion through Tunery vs in-process', 'chat_overhead', () =>
    measureChatOverhead(CHAT),
  );

  // 4: Python, after every server is gone.
  await measure(4, 'LoRA training tokens/s (CPU)', 'training_cpu', () => measureTraining(TRAINING));
} finally {
  await stopAll();
}

rows.sort((a, b) => a.section - b.section);
const cpu = cpus();
const environment = {
  started_at: startedAt.toISOString(),
  seconds: Math.round((Date.now() - startedAt.getTime()) / 1000),
  node: process.version,
  cpus: cpu.length,
  cpu_model: cpu[0]?.model ?? 'unknown',
  load_avg_1m: [Number(loadBefore.toFixed(2)), Number(loadavg()[0]!.toFixed(2))],
  quick,
};
console.log(
  `\nTunery benchmarks · ${environment.started_at} · ${environment.seconds} s · node ${environment.node} · ` +
    `${environment.cpus}× ${environment.cpu_model} · load ${environment.load_avg_1m.join(' → ')}` +
    (quick ? ' · --quick (figures not meaningful)' : ''),
);
console.log(renderTable(rows));
console.log(jsonLine({ environment, rows, results }));
process.exitCode = failed ? 1 : 0;
