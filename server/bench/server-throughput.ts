/**
 * 1 · Server: req/s and p50/p99 latency of `GET /v1/training/jobs/{id}` on the full Tunery app,
 * next to a bare Express route returning the same body, under the same autocannon load. Each
 * server runs in its own process; the two are measured alternately (A B, B A, A B …) after a
 * warm-up each, and every figure is the median of the repeats.
 */
import autocannon from 'autocannon';
import { median, ratio } from './stats.js';
import type { Measured, Row } from './table.js';

export interface LoadOptions {
  connections: number;
  seconds: number;
  warmupSeconds: number;
  repeats: number;
}

interface Sample {
  rps: number;
  p50: number;
  p99: number;
}

/** One autocannon run; any non-2xx answer or socket error fails the measurement. */
async function load(url: string, headers: Record<string, string>, connections: number, seconds: number) {
  const result = await autocannon({ url, connections, duration: seconds, headers });
  const bad = result.non2xx + result.errors + result.timeouts;
  if (bad > 0) {
    throw new Error(`${url}: ${result.non2xx} non-2xx, ${result.errors} errors, ${result.timeouts} timeouts`);
  }
  return { rps: result.requests.average, p50: result.latency.p50, p99: result.latency.p99 };
}

export async function measureGetJob(
  target: { tunery: string; bare: string; apiKey: string },
  opts: LoadOptions & { dbLabel: string; bodyBytes: number },
): Promise<Measured> {
  const headers = { authorization: `Bearer ${target.apiKey}`, accept: 'application/json' };
  const servers = { tunery: target.tunery, bare: target.bare } as const;
  const samples: Record<keyof typeof servers, Sample[]> = { tunery: [], bare: [] };

  for (const url of Object.values(servers)) await load(url, headers, opts.connections, opts.warmupSeconds);
  for (let i = 0; i < opts.repeats; i++) {
    // Alternate which goes first, so a drift in the machine's load hits both alike.
    const order = i % 2 === 0 ? (['tunery', 'bare'] as const) : (['bare', 'tunery'] as const);
    for (const name of order)
      samples[name].push(await load(servers[name], headers, opts.connections, opts.seconds));
  }

  const med = (name: keyof typeof servers, key: keyof Sample) => median(samples[name].map((s) => s[key]));
  const what = `GET /v1/training/jobs/{id}, ${opts.dbLabel}`;
  const setup = `${opts.connections} conns, ${opts.repeats}×${opts.seconds} s, ${opts.bodyBytes} B body`;
  const line = (measurement: string, key: keyof Sample, notes: string): Row => ({
    section: 1,
    measurement: `${what} · ${measurement}`,
    tunery: med('tunery', key),
    peer: med('bare', key),
    peerName: 'bare Express',
    ratio: ratio(med('tunery', key), med('bare', key)),
    notes,
  });
  return {
    rows: [
      line('req/s', 'rps', setup),
      line('p50 ms', 'p50', 'auth + request/response validation + knex'),
      line('p99 ms', 'p99', ''),
    ],
    data: { ...opts, samples },
  };
}
