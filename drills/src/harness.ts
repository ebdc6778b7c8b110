/**
 * Real processes for the fault drills: the server CLI (`node --import tsx server/src/cli.ts start`,
 * one process, so a kill -9 hits the server itself) and CPU workers (`.venv/bin/tunery-worker run`).
 * Every child keeps the tail of its stdout/stderr; `printChildrenOnFailure()` prints them when a test
 * fails, and `killAll()` ends whatever is still running (call it in afterAll).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { cp, mkdir, mkdtemp, readFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { inject, onTestFailed } from 'vitest';
import type { components } from '../../server/src/generated/api.js';
import { ROOT, SERVER_CLI, WORKER_BIN } from './harness-paths.js';

export { ROOT, SERVER_CLI, WORKER_BIN };

export type Schemas = components['schemas'];
export type TrainingJob = Schemas['TrainingJob'];
export type JobEvent = Schemas['JobEvent'];
export type ApiErrorBody = Schemas['Error'];

const TAIL_LINES = 300;
const children: Child[] = [];

/** A spawned process and the last lines it printed. */
export class Child {
  readonly lines: string[] = [];
  readonly exited: Promise<void>;
  private partial = '';

  constructor(
    readonly name: string,
    readonly proc: ChildProcess,
  ) {
    const keep = (chunk: Buffer) => {
      const parts = (this.partial + chunk.toString()).split('\n');
      this.partial = parts.pop() ?? '';
      for (const line of parts) this.push(line);
    };
    proc.stdout?.on('data', keep);
    proc.stderr?.on('data', keep);
    this.exited = new Promise((resolve) => {
      proc.once('exit', (code, signal) => {
        if (this.partial) this.push(this.partial);
        this.push(`[${name} exited: ${signal ?? `code ${code}`}]`);
        resolve();
      });
    });
    children.push(this);
  }

  private push(line: string) {
    this.lines.push(line.length > 2000 ? `${line.slice(0, 2000)}…` : line);
    if (this.lines.length > TAIL_LINES) this.lines.shift();
  }

  get pid(): number {
    return this.proc.pid ?? -1;
  }

  get alive(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** kill -9, and wait until the process is gone. */
  async kill9(): Promise<void> {
    if (this.alive) this.proc.kill('SIGKILL');
    await this.exited;
  }

  /** SIGTERM, then SIGKILL after `graceMs`. */
  async stop(graceMs = 5000): Promise<void> {
    if (!this.alive) return;
    this.proc.kill('SIGTERM');
    const timer = setTimeout(() => this.alive && this.proc.kill('SIGKILL'), graceMs);
    await this.exited;
    clearTimeout(timer);
  }

  tail(lines = 60): string {
    return this.lines.slice(-lines).join('\n');
  }
}

/** Ends every child this test file started (SIGTERM, then SIGKILL). */
export async function killAll(): Promise<void> {
  await Promise.all(children.map((child) => child.stop(3000)));
}

/** The recent output of every child this file started. */
export function childOutput(lines = 60): string {
  return children
    .map((c) => `----- ${c.name} (pid ${c.pid}${c.alive ? ', running' : ''}) -----\n${c.tail(lines)}`)
    .join('\n');
}

/** Call at the top of a test: if it fails, the children's output is printed with the failure. */
export function printChildrenOnFailure(): void {
  onTestFailed(() => {
    console.error(`\n===== child process output =====\n${childOutput()}\n`);
  });
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Polls `check` until it returns a value other than undefined/false, or throws after `timeoutMs`. */
export async function waitFor<T>(
  what: string,
  check: () => Promise<T | undefined | false>,
  { timeoutMs = 60_000, intervalMs = 150 }: { timeoutMs?: number; intervalMs?: number } = {},
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    try {
      const value = await check();
      if (value !== undefined && value !== false) return value;
    } catch (err) {
      lastError = err;
    }
    if (Date.now() > deadline) {
      const cause = lastError instanceof Error ? ` (last error: ${lastError.message})` : '';
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${cause}`);
    }
    await sleep(intervalMs);
  }
}

/** mulberry32: a small seeded PRNG, so a drill's random choices replay exactly. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const address = probe.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      probe.close(() => resolve(port));
    });
  });
}

export interface ApiResponse<T = unknown> {
  status: number;
  contentType: string;
  text: string;
  body: T;
}

export interface ServerOptions {
  /** Extra environment (TUNERY_LEASE_SECONDS, TUNERY_MAX_UPLOAD_BYTES, …). */
  env?: Record<string, string>;
  name?: string;
}

/**
 * The real server on a copy of the migrated template data dir (PGlite; the template already holds
 * the worker token, so no second process has to open the database). Restartable on the same data
 * dir and port.
 */
export class DrillServer {
  child!: Child;
  adminKey = '';
  readonly workerToken = inject('workerToken');
  private starts = 0;

  private constructor(
    readonly name: string,
    readonly dir: string,
    readonly port: number,
    readonly env: Record<string, string>,
  ) {}

  get dataDir(): string {
    return join(this.dir, 'data');
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  static async start(opts: ServerOptions = {}): Promise<DrillServer> {
    const dir = await mkdtemp(join(inject('drillRoot'), `${opts.name ?? 'server'}-`));
    const server = new DrillServer(opts.name ?? 'server', dir, await freePort(), opts.env ?? {});
    await cp(inject('templateDataDir'), server.dataDir, { recursive: true });
    await server.launch();
    server.adminKey = (await readFile(join(server.dataDir, 'admin-key'), 'utf8')).trim();
    return server;
  }

  /** Starts the server process (again) on the same data dir and port, and waits for /v1/health. */
  async launch(): Promise<void> {
    this.starts += 1;
    const proc = spawn(process.execPath, ['--import', 'tsx', SERVER_CLI, 'start'], {
      cwd: ROOT,
      env: {
        ...process.env,
        PORT: String(this.port),
        HOST: '127.0.0.1',
        TUNERY_DATA_DIR: this.dataDir,
        DATABASE_URL: '', // embedded PGlite in the data dir, whatever the caller's environment says
        // Only 5xx are logged at error level: the tail shows exactly what went wrong.
        LOG_LEVEL: 'error',
        TUNERY_MODEL_ROOTS: modelRoots(),
        ...this.env,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.child = new Child(`${this.name}#${this.starts}`, proc);
    await waitFor(
      `${this.name} to answer /v1/health`,
      async () => {
        if (!this.child.alive) throw new Error(`server exited during start-up:\n${this.child.tail()}`);
        const res = await fetch(`${this.url}/v1/health`).catch(() => undefined);
        return res?.status === 200;
      },
      { timeoutMs: 90_000, intervalMs: 200 },
    ).catch((err: Error) => {
      throw new Error(`${err.message}\n${this.child.tail()}`);
    });
  }

  async kill9(): Promise<void> {
    await this.child.kill9();
  }

  /** fetch with the admin key of tenant `default` (or `key`, or none with `key: null`). */
  async request<T = unknown>(
    method: string,
    path: string,
    init: { json?: unknown; body?: BodyInit; headers?: Record<string, string>; key?: string | null } = {},
  ): Promise<ApiResponse<T>> {
    const headers = new Headers(init.headers);
    const key = init.key === undefined ? this.adminKey : init.key;
    if (key) headers.set('authorization', `Bearer ${key}`);
    let body = init.body;
    if (init.json !== undefined) {
      headers.set('content-type', 'application/json');
      body = JSON.stringify(init.json);
    }
    const res = await fetch(`${this.url}${path}`, { method, headers, body });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = text ? JSON.parse(text) : undefined;
    } catch {
      // not JSON: left as text for the caller's assertion message
    }
    return {
      status: res.status,
      contentType: res.headers.get('content-type') ?? '',
      text,
      body: parsed as T,
    };
  }

  /** Like `request`, but any status other than `expect` throws with the body. */
  async ok<T>(method: string, path: string, json?: unknown, expect = [200, 201, 202]): Promise<T> {
    const res = await this.request<T>(method, path, json === undefined ? {} : { json });
    if (!expect.includes(res.status)) throw new Error(`${method} ${path}: ${res.status} ${res.text}`);
    return res.body;
  }

  job(id: string): Promise<TrainingJob> {
    return this.ok<TrainingJob>('GET', `/v1/training/jobs/${id}`);
  }

  async events(id: string): Promise<JobEvent[]> {
    return (await this.ok<Schemas['EventList']>('GET', `/v1/training/jobs/${id}/events`)).events;
  }

  /** Registers the tiny model the global setup made, as catalog name `drill-tiny`. */
  async registerTinyModel(): Promise<void> {
    await this.ok('POST', '/v1/base-models', {
      name: 'drill-tiny',
      source: inject('tinyModel'),
      architecture: 'llama',
    });
  }

  /** A LoRA fine-tune of the tiny model on inline texts. */
  async submitFinetune(opts: {
    maxSteps: number;
    saveSteps: number;
    maxAttempts?: number;
    texts?: string[];
    /** > 1: a gang of that many workers (each started with --gang-addr). */
    numNodes?: number;
  }): Promise<TrainingJob> {
    return this.ok<TrainingJob>('POST', '/v1/training/jobs', {
      base_model: 'drill-tiny',
      method: 'lora',
      train_texts: opts.texts ?? TRAIN_TEXTS,
      lora_config: { r: 4, lora_alpha: 8 },
      training_config: {
        max_steps: opts.maxSteps,
        save_steps: opts.saveSteps,
        logging_steps: 1,
        batch_size: 2,
        max_seq_length: 64,
        learning_rate: 0.001,
      },
      max_attempts: opts.maxAttempts ?? 5,
      ...(opts.numNodes ? { num_nodes: opts.numNodes } : {}),
    });
  }

  /** Waits until the job reaches a terminal status and returns it. */
  waitTerminal(id: string, timeoutMs = 120_000): Promise<TrainingJob> {
    return waitFor(
      `job ${id} to finish`,
      async () => {
        const job = await this.job(id);
        return ['completed', 'failed', 'cancelled'].includes(job.status) ? job : undefined;
      },
      { timeoutMs, intervalMs: 250 },
    );
  }
}

export const TRAIN_TEXTS = [
  'hello world, this is tunery',
  'the quick brown fox jumps over the lazy dog',
  'workers claim jobs and heartbeat their leases',
  'a checkpoint is everything needed to resume',
  'one two three four five six seven',
  'kill the worker and the job still finishes',
];

/** Where server and workers accept model paths from: the folder of the global setup's tiny model. */
const modelRoots = () => dirname(inject('tinyModel'));

/**
 * Starts a CPU worker against `server` (single-threaded torch: drills share two cores), or against
 * `serverUrl` when something (a HoldProxy) stands between them.
 */
export async function spawnWorker(
  server: DrillServer,
  workerId: string,
  serverUrl = server.url,
  /** More `tunery-worker run` options, e.g. `['--gang-addr', '127.0.0.1']`. */
  extraArgs: string[] = [],
): Promise<Child> {
  const workdir = join(server.dir, 'work', workerId);
  await mkdir(workdir, { recursive: true });
  const proc = spawn(
    WORKER_BIN,
    [
      'run',
      '--server',
      serverUrl,
      '--token',
      server.workerToken,
      '--device',
      'cpu',
      '--worker-id',
      workerId,
      '--workdir',
      workdir,
      '--wait-seconds',
      '1',
      ...extraArgs,
    ],
    {
      cwd: ROOT,
      env: {
        ...process.env,
        OMP_NUM_THREADS: '1',
        MKL_NUM_THREADS: '1',
        TOKENIZERS_PARALLELISM: 'false',
        PYTHONUNBUFFERED: '1',
        HF_HUB_OFFLINE: '1',
        TUNERY_MODEL_ROOTS: modelRoots(),
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  return new Child(workerId, proc);
}

/** The worker id that holds the job's current attempt, from its latest `claimed` event. */
export async function holderOf(server: DrillServer, jobId: string): Promise<string | undefined> {
  const claimed = (await server.events(jobId)).filter((e) => e.kind === 'claimed');
  const last = claimed.at(-1);
  const workerId = (last?.payload as { worker_id?: unknown } | undefined)?.worker_id;
  return typeof workerId === 'string' ? workerId : undefined;
}

/** True when `body` is the spec's one error shape. */
export function isErrorShape(body: unknown): body is ApiErrorBody {
  if (!body || typeof body !== 'object') return false;
  const error = (body as { error?: unknown }).error;
  if (!error || typeof error !== 'object') return false;
  const { code, message, param } = error as Record<string, unknown>;
  return (
    typeof code === 'string' &&
    code.length > 0 &&
    typeof message === 'string' &&
    (param === null || typeof param === 'string')
  );
}
