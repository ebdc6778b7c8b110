/**
 * 4 · CPU training throughput: runs `python -m tunery_worker.bench --json` from the repository's
 * `.venv` (the worker's LoRA loop vs a plain transformers+peft loop on the tiny model, alternating
 * step by step; see workers/tunery_worker/bench.py) and turns its JSON line into the table's line.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { repoRoot, stopChild, track } from './children.js';
import type { Measured } from './table.js';

export interface TrainingOptions {
  steps: number;
  timeoutSeconds: number;
}

interface LoopFigures {
  tokens_per_s: number;
}

interface TrainingReport {
  device: string;
  threads: number;
  model: string;
  params: number;
  batch_size: number;
  seq_len: number;
  steps: number;
  warmup: number;
  tunery: LoopFigures;
  peer: LoopFigures;
  ratio: number;
  /** Median over steps of peer / tunery step time, each tunery step paired with the peer step before it. */
  paired_ratio: number;
  /** The same on the thread's CPU time: what each step computed, whatever else the machine ran. */
  cpu_ratio: number;
  /** Both loops run in one process, alternating step by step. */
  peak_rss_mb: number;
}

/** Runs `python -m <module> …args` from the repository's .venv; resolves with its stdout. */
export function runPython(module: string, args: string[], timeoutSeconds: number): Promise<string> {
  const python = join(repoRoot, '.venv', 'bin', 'python');
  if (!existsSync(python)) {
    return Promise.reject(new Error(`${python} not found: run bash scripts/bootstrap.sh`));
  }
  const child = track(
    spawn(python, ['-m', module, ...args], {
      cwd: join(repoRoot, 'workers'),
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, PYTHONUNBUFFERED: '1' },
    }),
  );
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
    stdout += chunk;
  });
  child.stderr!.setEncoding('utf8').on('data', (chunk: string) => {
    stderr = (stderr + chunk).slice(-4000);
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      void stopChild(child);
      reject(new Error(`${module} took over ${timeoutSeconds} s`));
    }, timeoutSeconds * 1000);
    child.once('exit', (code) => {
      clearTimeout(timer);
      if (code === 0) resolve(stdout);
      else reject(new Error(`${module} exited ${code}: ${stderr.trim().split('\n').slice(-3).join(' / ')}`));
    });
  });
}

export async function measureTraining(opts: TrainingOptions): Promise<Measured> {
  const stdout = await runPython(
    'tunery_worker.bench',
    ['--json', '--steps', String(opts.steps)],
    opts.timeoutSeconds,
  );
  const report = JSON.parse(stdout.trim().split('\n').pop()!) as TrainingReport;
  const { tunery, peer } = report;
  return {
    rows: [
      {
        section: 4,
        measurement: `LoRA training tokens/s, ${report.device} (tiny llama, ${report.params.toLocaleString('en-US')} params)`,
        tunery: tunery.tokens_per_s,
        peer: peer.tokens_per_s,
        peerName: 'plain transformers+peft',
        ratio: report.ratio,
        notes:
          `median of steps ${report.warmup + 1}–${report.steps}, batch ${report.batch_size}×${report.seq_len}, ` +
          `${report.threads} thread, the loops alternate steps in one process (peak RSS ${Math.round(report.peak_rss_mb)} MB); ` +
          `paired-step ratio ${report.paired_ratio}×, CPU-time ratio ${report.cpu_ratio}×`,
      },
    ],
    data: report as unknown as Record<string, unknown>,
  };
}
