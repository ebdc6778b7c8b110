/**
 * Drill (b): kill -9 the server while a worker is mid-run (one job running, one waiting), restart it
 * on the same data dir and port. No job may be lost: after the restart the running job is still
 * `running` (its lease survived) or back to `pending` (it lapsed), the waiting one is `pending`,
 * and the same worker process — which was never restarted, its HTTP client retrying on its own —
 * finishes both.
 *
 * The worker reaches the server through a HoldProxy, which holds the first report the worker sends
 * after its first checkpoint is stored: the worker stalls there (at its next checkpoint at the
 * latest), so the kill lands mid-run however fast it trains, with no poll racing it. The held
 * answer is handed over once the server is back.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HoldProxy } from '../../e2e/src/hold-proxy.js';
import {
  DrillServer,
  killAll,
  printChildrenOnFailure,
  type Schemas,
  sleep,
  spawnWorker,
} from '../src/harness.js';

let server: DrillServer;
let proxy: HoldProxy | undefined;

beforeAll(async () => {
  server = await DrillServer.start({
    name: 'server-kill',
    env: { TUNERY_LEASE_SECONDS: '10', TUNERY_SWEEP_INTERVAL_MS: '500' },
  });
  await server.registerTinyModel();
});

afterAll(async () => {
  await killAll();
  await proxy?.close();
});

describe('drill: kill -9 the server mid-run', () => {
  it('loses no job; the worker reconnects by itself and finishes every job', async () => {
    printChildrenOnFailure();
    const first = await server.submitFinetune({ maxSteps: 40, saveSteps: 5 });
    const second = await server.submitFinetune({ maxSteps: 15, saveSteps: 5 });
    // The server keeps its port across the restart, so the proxy in front of it stays valid.
    proxy = await HoldProxy.start(server.url);
    let checkpointed = false;
    proxy.onAnswered(({ method, path, status }) => {
      if (method === 'PUT' && status === 201 && path.startsWith(`/v1/workers/jobs/${first.id}/checkpoints/`))
        checkpointed = true;
    });
    const held = proxy.holdNext(
      ({ method, path }) =>
        method === 'POST' && checkpointed && /\/(logs|metrics|events)$/.test(path) && path.includes(first.id),
    );
    const worker = await spawnWorker(server, 'drill-worker', proxy.url);
    const report = await held;
    const before = await server.job(first.id);
    expect(before.status).toBe('running');
    expect(before.last_checkpoint_step).toBeGreaterThanOrEqual(5);

    await server.kill9();
    // The outage itself (not a wait for anything): the worker's heartbeats fail meanwhile and are retried.
    await sleep(1000);
    await server.launch();
    expect(worker.alive, 'the worker must ride out the outage').toBe(true);

    // Nothing was lost: both jobs are there, neither failed, the checkpoint is still known.
    const [a, b] = await Promise.all([server.job(first.id), server.job(second.id)]);
    expect(['running', 'pending']).toContain(a.status);
    expect(a.last_checkpoint_step).toBeGreaterThanOrEqual(before.last_checkpoint_step);
    expect(b.status).toBe('pending');
    const list = await server.ok<Schemas['TrainingJobList']>('GET', '/v1/training/jobs?limit=100');
    expect(list.jobs.map((j) => j.id).sort()).toEqual([first.id, second.id].sort());
    // Let the worker go on: it gets the answer the old server gave to the report it was waiting on.
    report.release();

    const [doneA, doneB] = [await server.waitTerminal(first.id), await server.waitTerminal(second.id)];
    for (const [done, steps] of [
      [doneA, 40],
      [doneB, 15],
    ] as const) {
      expect(done.status, `${done.id} ended ${done.status}: ${JSON.stringify(done.error)}`).toBe('completed');
      expect(done.current_step).toBe(steps);
      expect(done.total_steps).toBe(steps);
    }
    // The first job either kept its lease or was re-queued once and resumed from its checkpoint.
    expect(doneA.retries).toBeLessThanOrEqual(1);
    expect(worker.alive, 'the same worker process finished the work').toBe(true);
    for (const id of [first.id, second.id]) {
      const claimers = (await server.events(id))
        .filter((e) => e.kind === 'claimed')
        .map((e) => (e.payload as { worker_id?: string }).worker_id);
      expect(new Set(claimers)).toEqual(new Set(['drill-worker']));
    }
    console.info(
      `after the restart the first job was ${a.status}; it finished with ${doneA.retries} retries`,
    );
  });
});
