// probe (not committed): drain N jobs on Tunery or the toy, report jobs/s, CPU per job of server, PG, client, and machine idle share

import { readFileSync } from 'node:fs';
import { Agent } from 'node:http';
import { serve } from './children.js';
import { postgresCpuMicros, processCpuMicros } from './process-cpu.js';
import { post } from './worker-protocol.js';

const [kind, n, warm] = [process.argv[2]!, Number(process.argv[3] ?? 5000), Number(process.argv[4] ?? 1000)];
const script = kind === 'tunery' ? 'serve-tunery.ts' : 'serve-toy-queue.ts';
const args =
  kind === 'tunery'
    ? ['--db', 'postgres', '--queue', String(n + warm)]
    : ['--jobs', String(n + warm), ...(kind === 'records' ? ['--records'] : [])];
const served = await serve<{ url: string; token?: string; workerToken?: string; pid: number }>(
  script,
  args,
  300_000,
);
const info = served.info;
const token = (info.workerToken ?? info.token)!;
const agent = new Agent({ keepAlive: true, maxSockets: 16 });
const RESULT = {
  loss_final: 1.234,
  eval_loss_final: null,
  ppl_baseline: 12.5,
  ppl_final: 3.4,
  ppl_delta_pct: -72.8,
  params_trainable: 1638400,
  params_before: 134515008,
  params_after: 134515008,
  tokens_processed: 51200,
  gpu_seconds: 1.5,
  train_seconds: 1.5,
  steps: 100,
  adapter: { name: 'bench-output', size_bytes: 6553600 },
  model: null,
};
let done = 0;
async function cycle(i: number) {
  const r = await post(agent, `${info.url}/v1/workers/claim`, token, {
    worker_id: `w${i}`,
    capabilities: { job_types: ['finetune'], methods: ['lora'], device: 'cpu', memory_gb: 16 },
    wait_seconds: 0,
  });
  if (r.status === 204) return false;
  const { job } = JSON.parse(r.text);
  const d = await post(agent, `${info.url}/v1/workers/jobs/${job.job_id}/complete`, token, {
    lease_token: job.lease_token,
    result: RESULT,
  });
  if (d.status !== 200) throw new Error(d.text);
  done++;
  return true;
}
const run = (limit: number) =>
  Promise.all(
    Array.from({ length: 16 }, async (_, i) => {
      while (done < limit) if (!(await cycle(i))) return;
    }),
  );
const idle = () => {
  const f = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.split(/\s+/).slice(1).map(Number);
  return { idle: f[3]!, io: f[4]!, total: f.reduce((a, b) => a + b, 0) };
};
await run(warm);
const h0 = process.hrtime.bigint() / 1000n;
const s0 = processCpuMicros(info.pid)!,
  p0 = postgresCpuMicros()!,
  c0 = process.cpuUsage(),
  i0 = idle(),
  t0 = performance.now(),
  d0 = done;
await run(Infinity);
const h1 = process.hrtime.bigint() / 1000n;
const secs = (performance.now() - t0) / 1000,
  jobs = done - d0,
  c = process.cpuUsage(c0),
  i1 = idle();
console.log(
  JSON.stringify({
    kind,
    jobs,
    rate: Math.round(jobs / secs),
    server: Math.round((processCpuMicros(info.pid)! - s0) / jobs),
    pg: Math.round((postgresCpuMicros()! - p0) / jobs),
    client: Math.round((c.user + c.system) / jobs),
    window: `${h0}-${h1}`,
    idleShare: +((i1.idle - i0.idle) / (i1.total - i0.total)).toFixed(3),
    ioShare: +((i1.io - i0.io) / (i1.total - i0.total)).toFixed(3),
  }),
);
agent.destroy();
await served.stop();
process.exit(0);
