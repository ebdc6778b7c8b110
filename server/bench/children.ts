/**
 * Child processes of a benchmark run: the servers under test (each in its own process, so the load
 * generator never shares their event loop) and the Python trainer. Every child is tracked and
 * killed when the run ends, however it ends; a server child also exits by itself when its stdin
 * closes, i.e. when this process is gone.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

export const benchDir = dirname(fileURLToPath(import.meta.url));
export const serverDir = dirname(benchDir);
export const repoRoot = dirname(serverDir);

const live = new Set<ChildProcess>();
/** How a server child announces that it listens: `READY {json}` on a line of its own. */
const READY = 'READY ';

/** Keeps the last `max` characters of a stream, for error messages. */
function tail(stream: NodeJS.ReadableStream | null, max = 4000): () => string {
  let text = '';
  stream?.setEncoding('utf8');
  stream?.on('data', (chunk: string) => {
    text = (text + chunk).slice(-max);
  });
  return () => text.trim();
}

export function track(child: ChildProcess): ChildProcess {
  live.add(child);
  child.once('exit', () => live.delete(child));
  return child;
}

/** SIGTERM, then SIGKILL after `graceMs` if the child is still there. */
export function stopChild(child: ChildProcess, graceMs = 5000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    child.kill('SIGTERM');
  });
}

export async function stopAll(): Promise<void> {
  await Promise.all([...live].map((child) => stopChild(child)));
}

// Last resort (an uncaught error, Ctrl-C): nothing outlives the run.
process.once('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    void stopAll().finally(() => process.exit(130));
  });
}

export interface Served<T> {
  info: T;
  stop(): Promise<void>;
}

/**
 * Runs `bench/<script>` in its own Node process (through tsx's loader) and waits for the
 * `READY {json}` line it prints once it listens (its URL and keys). Its stdout is read to the end,
 * so a chatty child never blocks on a full pipe.
 */
export async function serve<T>(script: string, args: string[] = [], timeoutMs = 90_000): Promise<Served<T>> {
  const child = track(
    spawn(process.execPath, ['--import', 'tsx', join(benchDir, script), ...args], {
      cwd: serverDir,
      stdio: ['pipe', 'pipe', 'pipe'],
      env: process.env,
    }),
  );
  const stderr = tail(child.stderr);
  const info = await new Promise<T>((resolve, reject) => {
    const lines = createInterface({ input: child.stdout! });
    const fail = (why: string) => {
      clearTimeout(timer);
      reject(new Error(`${script} ${why}${stderr() ? `:\n${stderr()}` : ''}`));
    };
    const timer = setTimeout(() => fail(`printed no JSON line in ${timeoutMs / 1000} s`), timeoutMs);
    child.once('exit', (code, signal) => fail(`exited (${signal ?? code}) before it was ready`));
    let ready = false;
    lines.on('line', (line) => {
      if (ready) {
        // The server's own log lines (BENCH_LOG_LEVEL): to our stderr, beside the progress lines.
        if (process.env.BENCH_LOG_LEVEL) process.stderr.write(`[${script}] ${line}\n`);
        return;
      }
      if (!line.startsWith(READY)) return;
      ready = true;
      clearTimeout(timer);
      resolve(JSON.parse(line.slice(READY.length)) as T);
    });
  }).catch(async (err) => {
    await stopChild(child);
    throw err;
  });
  return { info, stop: () => stopChild(child) };
}

/** Starts `bench/<script>`, runs `body` with what it announced, and stops it whatever happens. */
export async function withServed<T, R>(
  script: string,
  args: string[],
  body: (info: T) => Promise<R>,
  timeoutMs?: number,
): Promise<R> {
  const served = await serve<T>(script, args, timeoutMs);
  try {
    return await body(served.info);
  } finally {
    await served.stop();
  }
}
