/**
 * 5 · Inference relay: what the server adds to every chat completion, without a model. A serving
 * worker (here an HTTP loop that answers at once) long-polls `/v1/workers/inference/claim` and
 * reports its text; the caller POSTs `/openai/v1/chat/completions`, one request at a time. The
 * latency is queue row + wake-up + claim + report + NOTIFY relay + response; the peer is one plain
 * authenticated request (`GET /openai/v1/models/{id}`) on the same server, so the ratio reads as
 * "a relayed completion costs N plain requests".
 */
import type { TuneryInfo } from './serve-tunery.js';
import { median, percentile, ratio } from './stats.js';
import type { Measured } from './table.js';

export interface RelayOptions {
  requests: number;
  warmup: number;
}

const MODEL = 'smollm2-135m-instruct';

function post(url: string, token: string, body: unknown): Promise<Response> {
  return fetch(url, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
}

/** A serving worker that answers every request with "ok", until `stop`. */
function startAnsweringWorker(info: TuneryInfo) {
  let running = true;
  const loop = (async () => {
    while (running) {
      const res = await post(`${info.url}/v1/workers/inference/claim`, info.workerToken, {
        worker_id: 'bench-serving',
        wait_seconds: 1,
      });
      if (res.status === 204) continue;
      const request = (await res.json()) as { request_id: string; request_token: string };
      await post(`${info.url}/v1/workers/inference/${request.request_id}/report`, info.workerToken, {
        request_token: request.request_token,
        worker_id: 'bench-serving',
        text: 'ok',
        done: true,
        finish_reason: 'stop',
        usage: { prompt_tokens: 3, completion_tokens: 1 },
      }).then((r) => r.text());
    }
  })();
  return async () => {
    running = false;
    await loop;
  };
}

async function timed(n: number, call: () => Promise<Response>): Promise<number[]> {
  const ms: number[] = [];
  for (let i = 0; i < n; i++) {
    const started = performance.now();
    const res = await call();
    const body = await res.text();
    if (res.status !== 200) throw new Error(`answered ${res.status}: ${body.slice(0, 200)}`);
    ms.push(performance.now() - started);
  }
  return ms;
}

export async function measureInferenceRelay(
  info: TuneryInfo,
  label: string,
  opts: RelayOptions,
): Promise<Measured> {
  const stop = startAnsweringWorker(info);
  try {
    const chat = () =>
      post(`${info.url}/openai/v1/chat/completions`, info.apiKey, {
        model: MODEL,
        messages: [{ role: 'user', content: 'hi' }],
        max_tokens: 1,
      });
    const plain = () =>
      fetch(`${info.url}/openai/v1/models/${MODEL}`, { headers: { authorization: `Bearer ${info.apiKey}` } });
    await timed(opts.warmup, chat);
    await timed(opts.warmup, plain);
    const relayed = await timed(opts.requests, chat);
    const direct = await timed(opts.requests, plain);
    const p50 = median(relayed);
    const plainP50 = median(direct);
    return {
      rows: [
        {
          section: 5,
          measurement: `chat completion via relay, ${label} · ms p50`,
          tunery: p50,
          peer: plainP50,
          peerName: 'plain GET, same server',
          ratio: ratio(p50, plainP50),
          notes: `p99 ${percentile(relayed, 99).toFixed(1)} ms · ${opts.requests} sequential requests, worker answers at once`,
        },
      ],
      data: { p50_ms: p50, p99_ms: percentile(relayed, 99), plain_p50_ms: plainP50, requests: opts.requests },
    };
  } finally {
    await stop();
  }
}
