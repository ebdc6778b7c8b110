/**
 * Drill (a): kill -9 the worker running a job, five times, each time after the attempt has uploaded
 * a checkpoint of its own and before its next one. Short leases (3 s, swept every 500 ms) hand the
 * job to the next worker, which resumes from the last checkpoint. The job must finish `completed`
 * with every step 1..N trained (metrics), `current_step = total_steps = N`, and `retries` equal to
 * the kills.
 *
 * The workers reach the server through a HoldProxy: after an attempt's own checkpoint is stored,
 * the proxy holds the attempt's next report, which stalls its training at the next checkpoint at
 * the latest (a checkpoint first flushes the reports). The kill lands wherever the attempt then
 * is — up to a checkpoint interval of steps past its last checkpoint, to be trained again — and
 * no poll has to catch a moment a fast worker may already have passed.
 *
 * A spare worker is always started ahead of time (torch takes seconds to import), so the job is
 * picked up as soon as the lease lapses; after each kill a new spare is started.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type AnsweredRequest, HoldProxy } from '../../e2e/src/hold-proxy.js';
import {
  type Child,
  DrillServer,
  holderOf,
  killAll,
  printChildrenOnFailure,
  type Schemas,
  spawnWorker,
} from '../src/harness.js';

const KILLS = 5;
const MAX_STEPS = 80;
const SAVE_STEPS = 5;

let server: DrillServer;
let proxy: HoldProxy;

beforeAll(async () => {
  server = await DrillServer.start({
    name: 'worker-kill',
    env: { TUNERY_LEASE_SECONDS: '3', TUNERY_SWEEP_INTERVAL_MS: '500' },
  });
  await server.registerTinyModel();
  proxy = await HoldProxy.start(server.url);
});

afterAll(async () => {
  await killAll();
  await proxy?.close();
});

/** The step of a stored checkpoint upload of `jobId` (`PUT …/checkpoints/checkpoint-N?step=N` → N). */
function checkpointStep(jobId: string, req: AnsweredRequest): number | undefined {
  if (req.method !== 'PUT' || req.status !== 201) return undefined;
  const match = new RegExp(`^/v1/workers/jobs/${jobId}/checkpoints/[^?]+\\?step=(\\d+)`).exec(req.path);
  return match ? Number(match[1]) : undefined;
}

/** A report (logs, metrics, events) of `jobId`: what a worker's flush sends. */
const isReport = (jobId: string, path: string) =>
  new RegExp(`^/v1/workers/jobs/${jobId}/(logs|metrics|events)$`).test(path);

describe('drill: kill -9 the worker mid-run', () => {
  it(`a job survives ${KILLS} kill -9s of its worker, resumes from checkpoints, and counts them as retries`, async () => {
    printChildrenOnFailure();
    const job = await server.submitFinetune({ maxSteps: MAX_STEPS, saveSteps: SAVE_STEPS, maxAttempts: 10 });
    // Checkpoints stored by the attempt now running: a killed attempt's upload still in flight
    // carries its lease token, which the kill put on the dead list.
    const deadLeases = new Set<string>();
    const stored = new Map<string, number>(); // lease token → steps stored with it
    proxy.onAnswered((req) => {
      const lease = String(req.headers['x-lease-token'] ?? '');
      if (checkpointStep(job.id, req) !== undefined) stored.set(lease, (stored.get(lease) ?? 0) + 1);
    });
    const ownCheckpointStored = () => [...stored.keys()].some((lease) => !deadLeases.has(lease));
    const workers = new Map<string, Child>();
    let next = 0;
    const startWorker = async () => {
      const id = `drill-worker-${next++}`;
      workers.set(id, await spawnWorker(server, id, proxy.url));
    };

    const killedAt: { attempt: number; step: number; checkpoint: number; worker: string }[] = [];
    for (let kill = 1; kill <= KILLS; kill++) {
      // Armed before the attempt exists: the first report after a checkpoint of its own is held.
      const held = proxy.holdNext(
        ({ method, path }) => method === 'POST' && ownCheckpointStored() && isReport(job.id, path),
      );
      // One worker to run the attempt and one spare (the first time); later the spare runs it.
      if (kill === 1) await startWorker();
      await startWorker();
      await held;
      // Read while the attempt is stalled and still heartbeating: its attempt and checkpoint are fixed.
      const at = await server.job(job.id);
      expect(at).toMatchObject({ status: 'running', attempt: kill });
      const holder = await holderOf(server, job.id);
      const victim = holder ? workers.get(holder) : undefined;
      if (!holder || !victim) throw new Error(`no live worker holds ${job.id} (claimed by ${holder})`);
      await victim.kill9();
      workers.delete(holder);
      for (const lease of stored.keys()) deadLeases.add(lease);
      killedAt.push({
        attempt: kill,
        step: at.current_step,
        checkpoint: at.last_checkpoint_step,
        worker: holder,
      });
    }

    const done = await server.waitTerminal(job.id, 120_000);
    console.info(`kills: ${JSON.stringify(killedAt)}`);
    expect(done.status, `job ended ${done.status}: ${JSON.stringify(done.error)}`).toBe('completed');
    expect(done.retries).toBe(KILLS);
    expect(done.attempt).toBe(KILLS + 1);
    expect(done.total_steps).toBe(MAX_STEPS);
    expect(done.current_step).toBe(MAX_STEPS);
    expect(done.last_checkpoint_step).toBeLessThanOrEqual(MAX_STEPS);
    for (const k of killedAt) expect(k.checkpoint).toBeGreaterThanOrEqual(SAVE_STEPS);

    // Every step was trained and reported exactly once in the end (resumed steps are idempotent).
    const metrics = await server.ok<Schemas['MetricPage']>(
      'GET',
      `/v1/training/jobs/${job.id}/metrics?limit=10000`,
    );
    const trainSteps = new Set(metrics.points.filter((p) => p.phase !== 'eval').map((p) => p.step));
    expect(trainSteps.size).toBe(MAX_STEPS);
    expect(Math.max(...trainSteps)).toBe(MAX_STEPS);

    // The timeline tells the same story: one lease-expiry retry per kill, one claim per attempt.
    const events = await server.events(job.id);
    const retries = events.filter(
      (e) => e.kind === 'retry' && (e.payload as { reason?: string }).reason === 'lease_expired',
    );
    expect(retries).toHaveLength(KILLS);
    expect(events.filter((e) => e.kind === 'claimed')).toHaveLength(KILLS + 1);
    const claimers = events
      .filter((e) => e.kind === 'claimed')
      .map((e) => (e.payload as { worker_id?: string }).worker_id);
    expect(new Set(claimers).size, `every attempt ran on a different worker: ${claimers}`).toBe(KILLS + 1);

    // Each kill came after a checkpoint of the attempt's own: the resume point moved every time.
    const checkpoints = killedAt.map((k) => k.checkpoint);
    expect(checkpoints).toEqual([...new Set(checkpoints)].sort((a, b) => a - b));

    // The server stayed up throughout.
    expect((await server.request('GET', '/v1/health')).status).toBe(200);
  });
});
