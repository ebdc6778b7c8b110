/**
 * 6 · Serving overhead: chat completions of a tiny model on CPU through Tunery — the caller streams
 * `/openai/v1/chat/completions`, a real `tunery-worker run --serve` (transformers backend) generates —
 * against the same backend called in-process (`python -m tunery_worker.serve_bench`, the worker's own
 * `serve.generate`, no server). Same request, greedy, one at a time, after a warm-up; medians of time
 * to first text and of completion tokens per second. The difference in time to first text is what
 * the queue path (request row, wake-up, claim, reports, NOTIFY relay) costs a user.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot, serve, stopChild, track } from './children.js';
import type { TuneryInfo } from './serve-tunery.js';
import { median } from './stats.js';
import type { Measured } from './table.js';
import { runPython } from './training-throughput.js';

export interface ChatOverheadOptions {
  requests: number;
  warmup: number;
  maxTokens: number;
}

/** As serve_bench.py sends it. */
const MESSAGES = [{ role: 'user', content: 'Once upon a time' }];
const WORKER_BIN = join(repoRoot, '.venv', 'bin', 'tunery-worker');

interface DirectReport {
  ttft_ms_p50: number;
  tokens_per_s_p50: number;
  completion_tokens_p50: number;
}

interface Timing {
  ttftMs: number;
  tokensPerS: number;
  tokens: number;
}

/** One streamed chat completion: when its first text arrived, and its tokens per second in all. */
async function streamedCompletion(info: TuneryInfo, model: string, maxTokens: number): Promise<Timing> {
  const started = performance.now();
  const res = await fetch(`${info.url}/openai/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${info.apiKey}`, 'content-type': 'application/json' },
    body: JSON.stringify({
      model,
      messages: MESSAGES,
      max_tokens: maxTokens,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    }),
  });
  if (res.status !== 200) throw new Error(`chat completion answered ${res.status}: ${await res.text()}`);
  let firstText: number | undefined;
  let tokens = 0;
  let buffer = '';
  const decoder = new TextDecoder();
  const reader = res.body!.getReader();
  for (let read = await reader.read(); !read.done; read = await reader.read()) {
    buffer += decoder.decode(read.value, { stream: true });
    for (let end = buffer.indexOf('\n\n'); end >= 0; end = buffer.indexOf('\n\n')) {
      const data = buffer.slice(0, end).replace(/^data: /, '');
      buffer = buffer.slice(end + 2);
      if (data === '[DONE]') continue;
      const chunk = JSON.parse(data) as {
        choices: { delta: { content?: string } }[];
        usage?: { completion_tokens: number };
      };
      if (firstText === undefined && chunk.choices[0]?.delta.content) firstText = performance.now();
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
    }
  }
  const elapsed = performance.now() - started;
  return {
    ttftMs: (firstText ?? performance.now()) - started,
    tokensPerS: (tokens * 1000) / elapsed,
    tokens,
  };
}

/** The first answer, once the worker has started and said it serves (503 no_serving_worker until then). */
async function firstAnswer(call: () => Promise<Timing>, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await call();
      return;
    } catch (err) {
      if (Date.now() > deadline || !String(err).includes('503')) throw err;
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }
}

/** A serving worker for `info`'s server, in its own process, until the returned stop is called. */
function startServingWorker(info: TuneryInfo, workdir: string) {
  const child = track(
    spawn(
      WORKER_BIN,
      [
        'run',
        '--serve',
        '--serve-backend',
        'transformers',
        '--server',
        info.url,
        '--token',
        info.workerToken,
        '--device',
        'cpu',
        '--workdir',
        workdir,
      ],
      { stdio: ['ignore', 'ignore', 'ignore'], env: process.env },
    ),
  );
  return () => stopChild(child);
}

export async function measureChatOverhead(opts: ChatOverheadOptions): Promise<Measured> {
  const dir = await mkdtemp(join(tmpdir(), 'tunery-bench-serve-'));
  const modelDir = join(dir, 'tiny-llama');
  // The server and the worker accept the model's directory only inside an allowed root.
  process.env.TUNERY_MODEL_ROOTS = dir;
  try {
    await runPython('tunery_worker.cli', ['make-tiny-model', modelDir, '--arch', 'llama'], 120);
    const direct = JSON.parse(
      (
        await runPython(
          'tunery_worker.serve_bench',
          [
            '--model',
            modelDir,
            '--requests',
            String(opts.requests),
            '--warmup',
            String(opts.warmup),
            '--max-tokens',
            String(opts.maxTokens),
            '--json',
          ],
          600,
        )
      )
        .trim()
        .split('\n')
        .pop()!,
    ) as DirectReport;

    const server = await serve<TuneryInfo>('serve-tunery.ts', ['--db', 'pglite']);
    const stopWorker = startServingWorker(server.info, join(dir, 'worker'));
    try {
      const model = 'bench-tiny';
      const created = await fetch(`${server.info.url}/v1/base-models`, {
        method: 'POST',
        headers: { authorization: `Bearer ${server.info.apiKey}`, 'content-type': 'application/json' },
        body: JSON.stringify({ name: model, source: modelDir }),
      });
      if (created.status !== 201) throw new Error(`registering the model answered ${created.status}`);
      await firstAnswer(() => streamedCompletion(server.info, model, opts.maxTokens));
      for (let i = 0; i < opts.warmup; i++) await streamedCompletion(server.info, model, opts.maxTokens);
      const runs: Timing[] = [];
      for (let i = 0; i < opts.requests; i++)
        runs.push(await streamedCompletion(server.info, model, opts.maxTokens));
      const ttft = median(runs.map((r) => r.ttftMs));
      const tokensPerS = median(runs.map((r) => r.tokensPerS));
      const tokens = median(runs.map((r) => r.tokens));
      const note = `${opts.requests} sequential requests, ${tokens} tokens each, tiny Llama, CPU`;
      return {
        rows: [
          {
            section: 6,
            measurement: 'chat completion, time to first text · ms p50',
            tunery: ttft,
            peer: direct.ttft_ms_p50,
            peerName: 'same backend in-process',
            ratio: ttft / direct.ttft_ms_p50,
            notes: `overhead +${(ttft - direct.ttft_ms_p50).toFixed(1)} ms · ${note}`,
          },
          {
            section: 6,
            measurement: 'chat completion · completion tokens/s p50',
            tunery: tokensPerS,
            peer: direct.tokens_per_s_p50,
            peerName: 'same backend in-process',
            ratio: tokensPerS / direct.tokens_per_s_p50,
            notes: 'streamed through the relay (text reported every ≤50 ms)',
          },
        ],
        data: { tunery: { ttft_ms_p50: ttft, tokens_per_s_p50: tokensPerS, tokens_p50: tokens }, direct },
        ok: tokens === direct.completion_tokens_p50,
      };
    } finally {
      await stopWorker();
      await server.stop();
    }
  } finally {
    delete process.env.TUNERY_MODEL_ROOTS;
    await rm(dir, { recursive: true, force: true });
  }
}
