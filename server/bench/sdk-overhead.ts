/**
 * 3 · SDK overhead: the per-call latency of `tunery.training.jobs.retrieve(id)` against a raw
 * `fetch` of the same URL with the same headers (then `.json()`), sequential, on one running
 * server. The two alternate in rounds (which goes first alternates too) so that drift in the
 * machine's load hits both alike. Each figure is the median over rounds of that round's figure
 * (its median call, the difference of the two, their ratio).
 */
import { Tunery } from '../../packages/sdk/src/index.js';
import type { TuneryInfo } from './serve-tunery.js';
import { median } from './stats.js';
import type { Measured } from './table.js';

export interface SdkOptions {
  /** Calls of each kind, in total. */
  calls: number;
  rounds: number;
  /** Calls of each kind first, not measured. */
  warmup: number;
}

async function timeCalls(n: number, call: () => Promise<unknown>): Promise<number[]> {
  const samples: number[] = [];
  for (let i = 0; i < n; i++) {
    const started = performance.now();
    await call();
    samples.push((performance.now() - started) * 1000);
  }
  return samples;
}

export async function measureSdkOverhead(info: TuneryInfo, opts: SdkOptions): Promise<Measured> {
  const tunery = new Tunery({ baseURL: info.url, apiKey: info.apiKey });
  const url = `${info.url}/v1/training/jobs/${info.jobId}`;
  // The headers the SDK sends on a GET.
  const headers = { Accept: 'application/json', Authorization: `Bearer ${info.apiKey}` };
  const viaSdk = async () => {
    const job = await tunery.training.jobs.retrieve(info.jobId);
    if (job.id !== info.jobId) throw new Error('SDK returned another job');
  };
  const viaFetch = async () => {
    const res = await fetch(url, { headers });
    if (!res.ok) throw new Error(`GET ${url} answered ${res.status}`);
    const job = (await res.json()) as { id: string };
    if (job.id !== info.jobId) throw new Error('fetch returned another job');
  };

  await timeCalls(opts.warmup, viaSdk);
  await timeCalls(opts.warmup, viaFetch);
  const perRound = Math.ceil(opts.calls / opts.rounds);
  // Per round: the median call of each kind, their difference and their ratio.
  const rounds: { sdk: number; fetch: number }[] = [];
  for (let round = 0; round < opts.rounds; round++) {
    const sdkFirst = round % 2 === 0;
    const before = sdkFirst ? await timeCalls(perRound, viaSdk) : [];
    const raw = await timeCalls(perRound, viaFetch);
    const after = sdkFirst ? [] : await timeCalls(perRound, viaSdk);
    rounds.push({ sdk: median([...before, ...after]), fetch: median(raw) });
  }

  const sdk = median(rounds.map((r) => r.sdk));
  const raw = median(rounds.map((r) => r.fetch));
  const overhead = median(rounds.map((r) => r.sdk - r.fetch));
  return {
    rows: [
      {
        section: 3,
        measurement: 'SDK training.jobs.retrieve · median µs/call',
        tunery: sdk,
        peer: raw,
        peerName: 'raw fetch',
        ratio: median(rounds.map((r) => r.sdk / r.fetch)),
        notes:
          `overhead ${overhead >= 0 ? '+' : ''}${Math.round(overhead)} µs/call; ` +
          `${perRound * opts.rounds} sequential calls each, ${opts.rounds} rounds (medians of round medians)`,
      },
    ],
    data: {
      ...opts,
      sdk_median_us: sdk,
      fetch_median_us: raw,
      overhead_us: overhead,
      rounds_us: rounds,
    },
  };
}
