/**
 * Drill (a): kill -9 the worker running a job, five times, each at a random step after the attempt
 * has uploaded a checkpoint of its own. Short leases (3 s, swept every 500 ms) hand the job to the
 * next worker, which resumes from the last checkpoint. The job must finish `completed` with every
 * step 1..N trained (metrics), `current_step = total_steps = N`, and `retries` equal to the kills.
 *
 * A spare worker is always started ahead of time (torch takes seconds to import), so the job is
 * picked up as soon as the lease lapses; after each kill a new spare is started.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type Child,
  DrillServer,
  holderOf,
  killAll,
  printChildrenOnFailure,
  prng,
  type Schemas,
  spawnWorker,
  waitFor,
} from '../src/harness.js';

const KILLS = 5;
const MAX_STEPS = 80;
const SAVE_STEPS = 5;

let server: DrillServer;

beforeAll(async () => {
  server = await DrillServer.start({
    name: 'worker-kill',
    env: { TUNERY_LEASE_SECONDS: '3', TUNERY_SWEEP_INTERVAL_MS: '500' },
  });
  await server.registerTinyModel();
});

afterAll(killAll);

describe('drill: kill -9 the worker mid-run', () => {
  it(`a job survives ${KILLS} kill -9s of its worker, resumes from checkpoints, and counts them as retries`, async () => {
    printChildrenOnFailure();
    const random = prng(0x7e57_0a);
    const job = await server.submitFinetune({ maxSteps: MAX_STEPS, saveSteps: SAVE_STEPS, maxAttempts: 10 });
    const workers = new Map<string, Child>();
    let next = 0;
    const startWorker = async () => {
      const id = `drill-worker-${next++}`;
      workers.set(id, await spawnWorker(server, id));
    };
    // One to run the job and one spare.
    await startWorker();
    await startWorker();

    const killedAt: { attempt: number; step: number; checkpoint: number; worker: string }[] = [];
    for (let kill = 1; kill <= KILLS; kill++) {
      // The attempt `kill` is running; note where it resumed from.
      const resumedAt = await waitFor(
        `attempt ${kill} to start`,
        async () => {
          const j = await server.job(job.id);
          expect(j.status, `job ended early: ${JSON.stringify(j)}`).not.toMatch(/completed|failed|cancelled/);
          return j.status === 'running' && j.attempt === kill ? j.last_checkpoint_step : undefined;
        },
        { timeoutMs: 60_000 },
      );
      // Kill at a random step after this attempt's own first checkpoint (resume point + save_steps).
      const target = resumedAt + SAVE_STEPS + Math.floor(random() * SAVE_STEPS);
      const at = await waitFor(
        `attempt ${kill} to checkpoint past step ${resumedAt} and reach step ${target}`,
        async () => {
          const j = await server.job(job.id);
          expect(j.attempt, 'the attempt changed before the kill').toBe(kill);
          return j.last_checkpoint_step > resumedAt && j.current_step >= target ? j : undefined;
        },
        { timeoutMs: 60_000, intervalMs: 50 },
      );
      const holder = await holderOf(server, job.id);
      const victim = holder ? workers.get(holder) : undefined;
      if (!holder || !victim) throw new Error(`no live worker holds ${job.id} (claimed by ${holder})`);
      await victim.kill9();
      workers.delete(holder);
      killedAt.push({
        attempt: kill,
        step: at.current_step,
        checkpoint: at.last_checkpoint_step,
        worker: holder,
      });
      // The spare takes over once the lease lapses; start the next spare now.
      await startWorker();
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

    // The server stayed up throughout.
    expect((await server.request('GET', '/v1/health')).status).toBe(200);
  });
});
