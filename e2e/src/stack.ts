// A live Tunery on this machine: the real server (`server/src/cli.ts start`, one process), real CPU
// workers (`.venv/bin/tunery-worker run`), keys made with the CLI before the server starts, and a
// fresh PGlite data dir or a fresh Postgres database. Every child is killed at the end, even when a
// test failed, and (as a last resort) when the test process exits.
import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Tunery } from '@tunery/sdk';
import pg from 'pg';
import { type StrictResponses, strictResponses } from './strict-responses.js';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const WORKER_BIN = join(ROOT, '.venv', 'bin', 'tunery-worker');
export const PYTHON_BIN = join(ROOT, '.venv', 'bin', 'python');
const POSTGRES_URL = process.env.TUNERY_TEST_DATABASE_URL || 'postgres://postgres@127.0.0.1:5432/test';

// --- child processes --------------------------------------------------------------------------------

const live = new Set<Proc>();
const killAll = () => {
  for (const proc of live) proc.child.kill('SIGKILL');
};
// Last resort: nothing we started outlives the test process, whether it exits or is signalled.
process.on('exit', killAll);
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  const onSignal = () => {
    killAll();
    // Alone with this signal: take its default action (exit), as if we had not listened.
    if (process.listenerCount(signal) === 1) {
      process.removeListener(signal, onSignal);
      process.kill(process.pid, signal);
    }
  };
  process.on(signal, onSignal);
}

/** A child process whose output (stdout and stderr, interleaved) is kept for failure reports. */
export class Proc {
  readonly child: ChildProcess;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private readonly lines: string[] = [];
  private partial = '';

  constructor(
    readonly name: string,
    command: string,
    args: string[],
    opts: { cwd?: string; env?: Record<string, string> } = {},
  ) {
    this.child = spawn(command, args, {
      cwd: opts.cwd ?? ROOT,
      env: { ...process.env, ...opts.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    live.add(this);
    this.child.stdout?.on('data', (chunk: Buffer) => this.collect(chunk));
    this.child.stderr?.on('data', (chunk: Buffer) => this.collect(chunk));
    this.exited = new Promise((resolve) => {
      this.child.once('exit', (code, signal) => {
        live.delete(this);
        resolve({ code, signal });
      });
      this.child.once('error', (err) => {
        live.delete(this);
        this.lines.push(`spawn failed: ${err.message}`);
        resolve({ code: -1, signal: null });
      });
    });
  }

  private collect(chunk: Buffer): void {
    const text = this.partial + chunk.toString('utf8');
    const lines = text.split('\n');
    this.partial = lines.pop() ?? '';
    this.lines.push(...lines);
    if (this.lines.length > 2000) this.lines.splice(0, this.lines.length - 2000);
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** All output so far (the last 2000 lines). */
  output(): string {
    return [...this.lines, this.partial].join('\n');
  }

  tail(lines = 60): string {
    return [...this.lines, this.partial].slice(-lines).join('\n');
  }

  /** kill -9: no handler runs, no lease is handed back. */
  async kill9(): Promise<void> {
    if (this.running) this.child.kill('SIGKILL');
    await this.exited;
  }

  /** SIGTERM, then SIGKILL after `graceMs`. */
  async stop(graceMs = 10_000): Promise<void> {
    if (!this.running) return;
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    await this.exited;
    clearTimeout(timer);
  }
}

/** Runs a command to its end; resolves with stdout, rejects with stdout + stderr on a non-zero exit. */
export async function runToEnd(
  command: string,
  args: string[],
  opts: { cwd?: string; env?: Record<string, string>; timeoutMs?: number } = {},
): Promise<string> {
  const proc = new Proc(args[0] ?? command, command, args, opts);
  const stdout: string[] = [];
  proc.child.stdout?.on('data', (chunk: Buffer) => stdout.push(chunk.toString('utf8')));
  const timer = setTimeout(() => proc.child.kill('SIGKILL'), opts.timeoutMs ?? 120_000);
  const { code, signal } = await proc.exited;
  clearTimeout(timer);
  if (code !== 0) {
    throw new Error(`${command} ${args.join(' ')} ended with ${signal ?? code}:\n${proc.tail(40)}`);
  }
  return stdout.join('');
}

/** `tunery-server …`, in one node process (tsx as a loader, no wrapper process to outlive it). */
const serverCommand = (...args: string[]): [string, string[]] => [
  process.execPath,
  ['--import', 'tsx', join('server', 'src', 'cli.ts'), ...args],
];

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const address = probe.address();
      probe.close(() => resolve(typeof address === 'object' && address ? address.port : 0));
    });
  });
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Polls `check` every `intervalMs` until it returns a value other than undefined/false. */
export async function until<T>(
  what: string,
  check: () => Promise<T | undefined | false>,
  { timeoutMs = 60_000, intervalMs = 100 } = {},
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}

export const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');

export async function readAll(stream: ReadableStream<Uint8Array>): Promise<Buffer> {
  return Buffer.from(await new Response(stream).arrayBuffer());
}

// --- databases --------------------------------------------------------------------------------------

export type DatabaseChoice = 'pglite' | 'postgres';

/** A fresh database on the test Postgres (TUNERY_TEST_DATABASE_URL), dropped at the end. */
async function freshPostgres(): Promise<{ url: string; drop(): Promise<void> }> {
  const name = `tunery_e2e_${process.pid}_${Math.random().toString(36).slice(2, 10)}`;
  const admin = new pg.Client({ connectionString: POSTGRES_URL });
  try {
    await admin.connect();
  } catch (err) {
    throw new Error(
      `Postgres at ${POSTGRES_URL} is not reachable (${(err as Error).message}); set TUNERY_TEST_DATABASE_URL`,
    );
  }
  await admin.query(`CREATE DATABASE ${name}`);
  await admin.end();
  const url = new URL(POSTGRES_URL);
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    drop: async () => {
      const c = new pg.Client({ connectionString: POSTGRES_URL });
      await c.connect();
      await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      await c.end();
    },
  };
}

// --- the stack --------------------------------------------------------------------------------------

export interface StackOptions {
  /** Names the temp dir and the log headers. */
  name: string;
  database: DatabaseChoice;
  /** TUNERY_LEASE_SECONDS (a worker heartbeats every third of it). */
  leaseSeconds?: number;
  /** TUNERY_SWEEP_INTERVAL_MS. */
  sweepIntervalMs?: number;
  /** TUNERY_MODEL_ROOTS of the server and the workers: where base-model directories may be. */
  modelRoots?: string;
}

export interface Stack {
  url: string;
  apiKey: string;
  workerToken: string;
  dataDir: string;
  database: DatabaseChoice;
  server: Proc;
  workers: Proc[];
  client: Tunery;
  /** Every answer `client` got, checked against the spec made strict (see strict-responses.ts). */
  responses: StrictResponses;
  /** Starts one more CPU worker; `serverUrl` puts something (a HoldProxy) between it and the server. */
  /** A CPU worker; `extraArgs` go to `tunery-worker run` (`--serve` for a serving worker). */
  startWorker(label?: string, serverUrl?: string, extraArgs?: string[]): Proc;
  /** Registers a model directory as a base model of this tenant. */
  registerModel(name: string, source: string): Promise<void>;
  /** Every worker's output and the server's tail, for a failure report. */
  report(): string;
  stop(): Promise<void>;
}

export async function startStack(opts: StackOptions): Promise<Stack> {
  const dataDir = await mkdtemp(join(tmpdir(), `tunery-e2e-${opts.name}-`));
  const postgres = opts.database === 'postgres' ? await freshPostgres() : undefined;
  const env: Record<string, string> = {
    TUNERY_DATA_DIR: dataDir,
    DATABASE_URL: postgres?.url ?? '',
    TUNERY_LEASE_SECONDS: String(opts.leaseSeconds ?? 60),
    TUNERY_SWEEP_INTERVAL_MS: String(opts.sweepIntervalMs ?? 1000),
    LOG_LEVEL: 'warn',
    HOST: '127.0.0.1',
    TUNERY_MODEL_ROOTS: opts.modelRoots ?? '',
  };
  const workers: Proc[] = [];
  let server: Proc | undefined;
  const stop = async () => {
    await Promise.all(workers.map((w) => w.stop()));
    await server?.stop();
    await postgres?.drop().catch(() => {});
    await rm(dataDir, { recursive: true, force: true });
  };

  try {
    // Embedded PGlite is one process: keys are made before the server opens the database.
    const key = async (...args: string[]) => {
      const [command, argv] = serverCommand('keys', 'create', ...args);
      const stdout = await runToEnd(command, argv, { env });
      const last = stdout.trim().split('\n').at(-1)?.trim();
      if (!last) throw new Error(`keys create ${args.join(' ')} printed nothing`);
      return last;
    };
    const apiKey = await key('--tenant', `e2e-${opts.name}`);
    const workerToken = await key('--worker', '--name', `e2e-${opts.name}`);

    const port = await freePort();
    const url = `http://127.0.0.1:${port}`;
    const [command, argv] = serverCommand('start');
    server = new Proc(`server (${opts.database})`, command, argv, { env: { ...env, PORT: String(port) } });
    const started = server;
    await until(
      'the server to answer /v1/health',
      async () => {
        if (!started.running) throw new Error(`the server exited during start:\n${started.tail()}`);
        return fetch(`${url}/v1/health`).then(
          (r) => r.ok,
          () => false,
        );
      },
      { timeoutMs: 90_000, intervalMs: 150 },
    );

    const client = new Tunery({ baseURL: url, apiKey, logLevel: 'off' });
    const responses = strictResponses();
    client.use(responses.middleware);
    const startWorker = (label = `w${workers.length + 1}`, serverUrl = url, extraArgs: string[] = []) => {
      const worker = new Proc(
        `worker ${label}`,
        WORKER_BIN,
        [
          'run',
          '--server',
          serverUrl,
          '--token',
          workerToken,
          '--device',
          'cpu',
          '--worker-id',
          `e2e-${opts.name}-${label}`,
          '--workdir',
          join(dataDir, `work-${label}`),
          // A short long-poll, so that a stopping worker exits quickly.
          '--wait-seconds',
          '2',
          ...extraArgs,
        ],
        { env: { PYTHONUNBUFFERED: '1', TUNERY_MODEL_ROOTS: env.TUNERY_MODEL_ROOTS! } },
      );
      workers.push(worker);
      return worker;
    };
    const report = () =>
      [
        ...workers.map((w) => `----- ${w.name} (${w.running ? 'running' : 'exited'}) -----\n${w.tail(80)}`),
        `----- ${started.name} -----\n${started.tail(30)}`,
      ].join('\n');
    return {
      url,
      apiKey,
      workerToken,
      dataDir,
      database: opts.database,
      server: started,
      workers,
      client,
      responses,
      startWorker,
      registerModel: async (name, source) => {
        await client.baseModels.create({ name, source });
      },
      report,
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}
