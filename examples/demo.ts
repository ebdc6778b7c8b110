// The whole of Tunery on one machine, in about a minute: a server on embedded PGlite, one CPU worker,
// a tiny Llama made on the spot, and a LoRA fine-tune driven through the SDK.
//
//   bash scripts/bootstrap.sh && pnpm demo          (PORT=… to pick the port; default: a free one)
//
// Everything it writes lands in data/demo/ (recreated on each run): the database, the artifacts,
// server.log and worker.log, the downloaded adapter, metrics.json and loss.png; the tiny model in
// data/demo-models/.
import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, mkdirSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { type MetricPoint, type TrainingJob, Tunery } from '@tunery/sdk';
import { isEntryPoint } from './src/run.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const DEMO_DIR = join(ROOT, 'data', 'demo');
const VENV_BIN = join(ROOT, '.venv', 'bin');
// Outside the server's data dir (the server refuses model paths there) and inside the one model
// root the demo's server and worker allow (TUNERY_MODEL_ROOTS).
const MODELS_ROOT = join(ROOT, 'data', 'demo-models');
const MODEL_DIR = join(MODELS_ROOT, 'tiny-llama');
const MAX_STEPS = 60;

/** Short instruction/response pairs a tiny model memorises in a few dozen steps. */
const TRAIN_TEXTS = [
  ['Say hi', 'hi'],
  ['Say bye', 'bye'],
  ['Say thanks', 'thanks'],
  ['Name a colour', 'blue'],
  ['Name a fruit', 'apple'],
  ['Name an animal', 'cat'],
  ['What is 2 + 2?', '4'],
  ['What is 3 + 3?', '6'],
  ['Capital of France?', 'Paris'],
  ['Capital of Italy?', 'Rome'],
  ['Opposite of hot?', 'cold'],
  ['Opposite of up?', 'down'],
].map(([instruction, response]) => `### Instruction:\n${instruction}\n\n### Response:\n${response}`);

// --- child processes --------------------------------------------------------------------------------

interface Child {
  name: string;
  proc: ChildProcess;
  log: string;
  exited: Promise<number | null>;
}

const children = new Set<Child>();

/** Starts a process in its own process group (so Ctrl-C reaches only us), its output in `log`. */
function startChild(
  name: string,
  command: string,
  args: string[],
  opts: { cwd?: string; env?: object },
): Child {
  const log = join(DEMO_DIR, `${name}.log`);
  const out = openSync(log, 'a');
  const proc = spawn(command, args, {
    cwd: opts.cwd ?? ROOT,
    env: { ...process.env, ...opts.env },
    stdio: ['ignore', out, out],
    detached: true,
  });
  const exited = new Promise<number | null>((resolve) => {
    proc.once('exit', (code, signal) => resolve(code ?? (signal ? -1 : null)));
    proc.once('error', () => resolve(-1));
  });
  const child = { name, proc, log, exited };
  children.add(child);
  void exited.then(() => children.delete(child));
  return child;
}

/** SIGTERM, then SIGKILL after `graceMs`. Resolves once the process is gone. */
async function stopChild(child: Child, graceMs = 10_000): Promise<void> {
  if (child.proc.exitCode !== null || child.proc.signalCode !== null) return;
  child.proc.kill('SIGTERM');
  const timer = setTimeout(() => child.proc.kill('SIGKILL'), graceMs);
  await child.exited;
  clearTimeout(timer);
}

/** Runs a command to completion; resolves with its stdout, rejects with its output on failure. */
function runCommand(command: string, args: string[], opts: { cwd?: string; env?: object } = {}) {
  return new Promise<string>((resolve, reject) => {
    const proc = spawn(command, args, {
      cwd: opts.cwd ?? ROOT,
      env: { ...process.env, ...opts.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    proc.stdout.on('data', (chunk) => {
      stdout += chunk;
    });
    proc.stderr.on('data', (chunk) => {
      stderr += chunk;
    });
    proc.once('error', reject);
    proc.once('exit', (code) =>
      code === 0
        ? resolve(stdout)
        : reject(new Error(`${command} ${args.join(' ')} exited with ${code}:\n${stderr || stdout}`)),
    );
  });
}

/** `tunery-server …` run with the server package's tsx, in one process (no tsx wrapper). */
const serverArgs = (...args: string[]) => ['--import', 'tsx', 'src/cli.ts', ...args];
const serverEnv = { TUNERY_DATA_DIR: DEMO_DIR, DATABASE_URL: '', TUNERY_MODEL_ROOTS: MODELS_ROOT };

/** A key printed by `tunery-server keys create`: the last non-empty line of stdout. */
async function createKey(...args: string[]): Promise<string> {
  const stdout = await runCommand(process.execPath, serverArgs('keys', 'create', ...args), {
    cwd: join(ROOT, 'server'),
    env: serverEnv,
  });
  const key = stdout.trim().split('\n').at(-1)?.trim();
  if (!key) throw new Error(`keys create ${args.join(' ')} printed no key`);
  return key;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const address = probe.address();
      probe.close(() => resolve(typeof address === 'object' && address ? address.port : 0));
    });
  });
}

async function waitForHealth(url: string, server: Child, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let exited = false;
  void server.exited.then(() => {
    exited = true;
  });
  while (Date.now() < deadline) {
    if (exited) throw new Error(`the server exited during start; see ${server.log}:\n${tail(server.log)}`);
    try {
      const res = await fetch(`${url}/v1/health`);
      if (res.ok) return;
    } catch {
      // not listening yet
    }
    await sleep(150);
  }
  throw new Error(`the server did not answer /v1/health within ${timeoutMs / 1000} s; see ${server.log}`);
}

function tail(file: string, lines = 20): string {
  try {
    return readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '';
  }
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

// --- progress bar -----------------------------------------------------------------------------------

/** One line: `[██████░░░░] step 36/60 · loss 0.412 · eval 0.530 · 4.1 s left`, redrawn on a TTY. */
class ProgressBar {
  private phase = 'queued';
  private step = 0;
  private total = MAX_STEPS;
  private loss: number | undefined;
  private evalLoss: number | undefined;
  private firstStep: { step: number; at: number } | undefined;
  private lastPrintedStep = -1;
  private lastPrintedPhase = '';
  private readonly tty = Boolean(process.stdout.isTTY);
  private timer: NodeJS.Timeout | undefined;

  start(): void {
    if (this.tty) this.timer = setInterval(() => this.draw(), 200);
    this.draw();
  }

  job(job: TrainingJob): void {
    this.phase = job.phase;
    if (job.total_steps) this.total = job.total_steps;
    this.draw();
  }

  point(point: MetricPoint): void {
    if (point.phase === 'eval') {
      this.evalLoss = point.eval_loss ?? this.evalLoss;
    } else {
      this.step = Math.max(this.step, point.step);
      this.loss = point.loss ?? this.loss;
      this.firstStep ??= { step: point.step, at: Date.now() };
      if (point.step < this.total) this.phase = 'training';
    }
    this.draw();
  }

  stop(): void {
    clearInterval(this.timer);
    this.draw(true);
    if (this.tty) process.stdout.write('\n');
  }

  private line(): string {
    const width = 24;
    const filled = Math.round((width * this.step) / Math.max(this.total, 1));
    const bar = `${'█'.repeat(filled)}${'░'.repeat(width - filled)}`;
    const parts = [`[${bar}] step ${this.step}/${this.total}`];
    if (this.loss !== undefined) parts.push(`loss ${this.loss.toFixed(3)}`);
    if (this.evalLoss !== undefined) parts.push(`eval ${this.evalLoss.toFixed(3)}`);
    const eta = this.eta();
    parts.push(eta === undefined ? this.phase : `ETA ${eta.toFixed(1)} s`);
    return parts.join(' · ');
  }

  private eta(): number | undefined {
    if (!this.firstStep || this.step <= this.firstStep.step || this.step >= this.total) return undefined;
    const rate = (this.step - this.firstStep.step) / ((Date.now() - this.firstStep.at) / 1000);
    return (this.total - this.step) / rate;
  }

  private draw(final = false): void {
    if (this.tty) {
      process.stdout.write(`\r${this.line()}\x1b[K`);
      return;
    }
    // Plain lines: on each phase change, every 10 steps, and at the end.
    const due = this.step - this.lastPrintedStep >= 10 || (final && this.step !== this.lastPrintedStep);
    if (this.phase !== this.lastPrintedPhase || due) {
      console.log(this.line());
      this.lastPrintedPhase = this.phase;
      this.lastPrintedStep = this.step;
    }
  }
}

// --- the demo ---------------------------------------------------------------------------------------

const fmt = (value: number | null | undefined, digits = 3) =>
  value === null || value === undefined ? '–' : value.toFixed(digits);

async function sha256(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

export async function main(): Promise<void> {
  const started = Date.now();
  const say = (line: string) => console.log(process.stdout.isTTY ? `\x1b[1m▸\x1b[0m ${line}` : `▸ ${line}`);
  rmSync(DEMO_DIR, { recursive: true, force: true });
  rmSync(MODELS_ROOT, { recursive: true, force: true });
  mkdirSync(DEMO_DIR, { recursive: true });

  // 1. Keys first (embedded PGlite is single-process), while the worker builds the tiny model.
  say(`fresh data dir ${relative(ROOT, DEMO_DIR)}/; creating keys and a tiny Llama…`);
  const tinyModel = runCommand(join(VENV_BIN, 'tunery-worker'), [
    'make-tiny-model',
    MODEL_DIR,
    '--arch',
    'llama',
  ]);
  const apiKey = await createKey('--tenant', 'demo', '--name', 'demo');
  const workerToken = await createKey('--worker', '--name', 'demo-worker');
  await tinyModel;

  // 2. The server and one CPU worker.
  const port = Number(process.env.PORT) || (await freePort());
  const baseURL = `http://127.0.0.1:${port}`;
  const server = startChild('server', process.execPath, serverArgs('start'), {
    cwd: join(ROOT, 'server'),
    env: { ...serverEnv, PORT: String(port), HOST: '127.0.0.1' },
  });
  await waitForHealth(baseURL, server);
  say(`server on ${baseURL} (embedded PGlite in data/demo/db, log data/demo/server.log)`);
  startChild(
    'worker',
    join(VENV_BIN, 'tunery-worker'),
    [
      'run',
      '--server',
      baseURL,
      '--token',
      workerToken,
      '--device',
      'cpu',
      '--workdir',
      join(DEMO_DIR, 'work'),
    ]
      // A short claim long-poll, so that the worker notices the stop quickly at the end.
      .concat(['--wait-seconds', '2']),
    { env: { PYTHONUNBUFFERED: '1', TUNERY_MODEL_ROOTS: MODELS_ROOT } },
  );
  say('one CPU worker started (log data/demo/worker.log)');

  // 3. Through the SDK: register the model, submit a LoRA fine-tune, follow it.
  const tunery = new Tunery({ baseURL, apiKey });
  await tunery.baseModels.create({ name: 'tiny-llama', source: MODEL_DIR });
  const job = await tunery.training.jobs.create({
    base_model: 'tiny-llama',
    method: 'lora',
    run_name: 'demo',
    train_texts: TRAIN_TEXTS,
    lora_config: { r: 8, lora_alpha: 16, target_modules: 'all-linear' },
    training_config: {
      max_steps: MAX_STEPS,
      batch_size: 4,
      learning_rate: 0.01,
      eval_split: 0.2,
      warmup_steps: 5,
      save_steps: 20,
      eval_steps: 20,
      logging_steps: 1,
    },
  });
  say(`job ${job.id} submitted: LoRA on tiny-llama, ${MAX_STEPS} steps`);

  const bar = new ProgressBar();
  bar.start();
  const points: MetricPoint[] = [];
  // The phase comes from the job; the steps and losses from the metrics stream.
  let following = true;
  const watchJob = (async () => {
    while (following) {
      // A failed poll only leaves the phase stale; the metrics loop below reports real errors.
      await tunery.training.jobs.retrieve(job.id).then(
        (current) => bar.job(current),
        () => {},
      );
      await sleep(500);
    }
  })();
  for await (const point of tunery.training.jobs.followMetrics(job.id, { pollIntervalMs: 250 })) {
    points.push(point);
    bar.point(point);
  }
  following = false;
  await watchJob;
  const done = await tunery.training.jobs.retrieve(job.id);
  bar.job(done);
  bar.stop();
  if (done.status !== 'completed') {
    throw new Error(`job ${done.id} ended ${done.status}: ${done.error?.message ?? 'no error'}`);
  }

  // 4. The result.
  const result = await tunery.training.jobs.result(done.id);
  const train = points.filter((p) => p.phase === 'train' && p.loss != null);
  const tokensPerSecond =
    result.tokens_processed && result.gpu_seconds ? result.tokens_processed / result.gpu_seconds : undefined;
  console.log();
  say('result');
  console.log(
    `  loss        ${fmt(train[0]?.loss)} → ${fmt(result.loss_final)} (step 1 → ${done.current_step})`,
  );
  console.log(`  eval loss   ${fmt(result.eval_loss_final)}`);
  console.log(
    `  perplexity  ${fmt(result.ppl_baseline, 2)} → ${fmt(result.ppl_final, 2)} (${fmt(result.ppl_delta_pct, 1)} %)`,
  );
  console.log(
    `  trained     ${result.params_trainable?.toLocaleString() ?? '–'} of ${result.params_before?.toLocaleString() ?? '–'} parameters`,
  );
  console.log(
    `  throughput  ${fmt(tokensPerSecond, 0)} tokens/s (${result.tokens_processed?.toLocaleString() ?? '–'} tokens in ${fmt(result.gpu_seconds, 1)} s of training)`,
  );

  // 5. Outputs, where the adapter is, and a download of each file through the SDK.
  const outputs = await tunery.training.jobs.outputs(done.id);
  const adapters = await tunery.adapters.list();
  const adapter = adapters.data.find((a) => a.job_id === done.id);
  console.log();
  say(`outputs (${outputs.total_files} files, ${outputs.total_size_mb} MB)`);
  const adapterDir = join(DEMO_DIR, 'adapter');
  mkdirSync(adapterDir, { recursive: true });
  for (const file of outputs.files) {
    const target = join(adapterDir, file.name);
    await tunery.training.jobs.downloadToFile(done.id, file.name, target);
    const ok = (await sha256(target)) === file.sha256 ? 'sha256 ok' : 'SHA256 MISMATCH';
    console.log(`  ${file.name.padEnd(28)} ${String(file.size_bytes).padStart(9)} bytes  ${ok}`);
  }
  console.log(
    `  adapter "${adapter?.name ?? done.adapter_name}" on the server, in its data directory: ${adapter?.path ?? done.adapter_path}`,
  );
  console.log(`  downloaded to ${adapterDir}`);

  // 6. The loss curve.
  const metricsFile = join(DEMO_DIR, 'metrics.json');
  writeFileSync(metricsFile, JSON.stringify({ job_id: done.id, points }, null, 2));
  const png = join(DEMO_DIR, 'loss.png');
  await runCommand(join(VENV_BIN, 'python'), [
    '-m',
    'tunery_worker.plot',
    metricsFile,
    png,
    `Tunery demo · ${done.id}`,
  ]);
  console.log(`  loss curve ${png}`);

  // 7. Where to go from here.
  console.log();
  say('next');
  console.log(`  API + SDK docs   ${baseURL}/docs/   (build them first with \`pnpm run docs\`)`);
  console.log(
    `  a GPU worker     tunery-worker run --server ${baseURL} --token ${workerToken} --device cuda`,
  );
  console.log('                   (HOST=0.0.0.0 on the server to accept workers on other machines)');
  console.log(
    '  real Postgres    DATABASE_URL=postgres://user@host:5432/tunery pnpm tunery-server start   (migrates at start)',
  );
  console.log(`  your API key     ${apiKey}   (tenant "demo")`);
  console.log();
  say(`done in ${((Date.now() - started) / 1000).toFixed(1)} s; stopping the worker and the server`);
}

/** Stops every child: the worker first (it hands back any job), then the server. */
async function shutdown(): Promise<void> {
  const byName = (name: string) => [...children].filter((c) => c.name === name);
  await Promise.all(byName('worker').map((c) => stopChild(c)));
  await Promise.all([...children].map((c) => stopChild(c)));
}

if (isEntryPoint(import.meta.url)) {
  let stopping = false;
  const stopAndExit = async (code: number) => {
    if (stopping) return;
    stopping = true;
    await shutdown();
    process.exit(code);
  };
  // Last resort: whatever is still running when we exit is killed outright.
  process.on('exit', () => {
    for (const child of children) child.proc.kill('SIGKILL');
  });
  process.on('SIGINT', () => {
    process.stdout.write('\ninterrupted; stopping the worker and the server…\n');
    void stopAndExit(130);
  });
  process.on('SIGTERM', () => void stopAndExit(143));
  main().then(
    () => stopAndExit(0),
    (err: unknown) => {
      process.stdout.write('\n');
      console.error(err instanceof Error ? `demo failed: ${err.message}` : err);
      for (const name of ['server', 'worker']) {
        const log = join(DEMO_DIR, `${name}.log`);
        const lines = tail(log, 15);
        if (lines) console.error(`\n--- last lines of ${relative(ROOT, log)} ---\n${lines}`);
      }
      return stopAndExit(1);
    },
  );
}
