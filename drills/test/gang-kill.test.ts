/**
 * Drill: kill -9 the rank-1 worker of a two-node gang (num_nodes: 2, two CPU workers, gloo) after
 * the gang stored a checkpoint. The lost member's lease lapses (3 s leases, swept every 500 ms),
 * which ends the attempt for the whole gang: the job goes back to the queue, rank 0's worker is
 * fenced out (its next write is `lease_lost`) and stops its group, and a new gang of the surviving
 * worker and a spare resumes from the last checkpoint and completes the job.
 *
 * The workers reach the server through a HoldProxy, which holds the first report rank 0's worker
 * sends after a checkpoint is stored: the worker's forwarding of rank 0's reports stalls there, so
 * the job cannot complete before the kill. The hold is released only once the attempt has ended.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type AnsweredRequest, HoldProxy } from '../../e2e/src/hold-proxy.js';
import {
  type Child,
  DrillServer,
  killAll,
  printChildrenOnFailure,
  type Schemas,
  spawnWorker,
  waitFor,
} from '../src/harness.js';

const MAX_STEPS = 40;
const SAVE_STEPS = 5;
const GANG = ['--gang-addr', '127.0.0.1'];

let server: DrillServer;
let proxy: HoldProxy;

beforeAll(async () => {
  server = await DrillServer.start({
    name: 'gang-kill',
    env: { TUNERY_LEASE_SECONDS: '3', TUNERY_SWEEP_INTERVAL_MS: '500', TUNERY_GANG_WINDOW_SECONDS: '30' },
  });
  await server.registerTinyModel();
  proxy = await HoldProxy.start(server.url);
});

afterAll(async () => {
  await killAll();
  await proxy?.close();
});

const isCheckpointStored = (jobId: string, req: AnsweredRequest) =>
  req.method === 'PUT' && req.status === 201 && req.path.startsWith(`/v1/workers/jobs/${jobId}/checkpoints/`);
const isReport = (jobId: string, path: string) =>
  new RegExp(`^/v1/workers/jobs/${jobId}/(logs|metrics|events)$`).test(path);

interface GangStarted {
  attempt: number;
  world: number;
  members: { rank: number; worker_id: string }[];
}

describe('drill: kill -9 a gang member mid-run', () => {
  it('a two-node job survives the kill -9 of its rank-1 worker: the gang ends, re-forms and resumes', async () => {
    printChildrenOnFailure();
    const job = await server.submitFinetune({
      maxSteps: MAX_STEPS,
      saveSteps: SAVE_STEPS,
      maxAttempts: 5,
      numNodes: 2,
    });
    let checkpointStored = false;
    proxy.onAnswered((req) => {
      if (isCheckpointStored(job.id, req)) checkpointStored = true;
    });
    const held = proxy.holdNext(
      ({ method, path }) => method === 'POST' && checkpointStored && isReport(job.id, path),
    );
    const workers = new Map<string, Child>();
    const startWorker = async (id: string) => {
      workers.set(id, await spawnWorker(server, id, proxy.url, GANG));
    };
    await startWorker('gang-a');
    await startWorker('gang-b');
    const stalled = await held;

    const at = await server.job(job.id);
    expect(at).toMatchObject({ status: 'running', attempt: 1 });
    expect(at.last_checkpoint_step).toBeGreaterThanOrEqual(SAVE_STEPS);
    const first = (await server.events(job.id)).filter((e) => e.kind === 'gang_started');
    expect(first).toHaveLength(1);
    const gang1 = first[0]!.payload as unknown as GangStarted;
    expect(gang1).toMatchObject({ attempt: 1, world: 2 });
    const rank1 = gang1.members.find((m) => m.rank === 1)!.worker_id;
    const survivor = gang1.members.find((m) => m.rank === 0)!.worker_id;

    // The spare can only join the next gang: the job is running, nobody is offered it now.
    await startWorker('gang-spare');
    await workers.get(rank1)!.kill9();
    workers.delete(rank1);

    // The lost member ends the attempt for all; only then does rank 0's worker go on (and is fenced).
    await waitFor('the gang attempt to end', async () => {
      const kinds = (await server.events(job.id)).map((e) => e.kind);
      return kinds.includes('gang_member_lost') && kinds.includes('retry');
    });
    stalled.release();

    const done = await server.waitTerminal(job.id, 300_000);
    expect(done.status, `job ended ${done.status}: ${JSON.stringify(done.error)}`).toBe('completed');
    expect(done).toMatchObject({ retries: 1, attempt: 2, total_steps: MAX_STEPS, current_step: MAX_STEPS });

    const events = await server.events(job.id);
    const lost = events.filter((e) => e.kind === 'gang_member_lost');
    expect(lost.map((e) => e.payload)).toEqual([{ attempt: 1, rank: 1, worker_id: rank1 }]);
    const retries = events.filter((e) => e.kind === 'retry');
    expect(retries).toHaveLength(1);
    expect(retries[0]!.payload).toMatchObject({ reason: 'lease_expired', attempt: 1 });
    const gangs = events
      .filter((e) => e.kind === 'gang_started')
      .map((e) => e.payload as unknown as GangStarted);
    expect(gangs.map((g) => g.attempt)).toEqual([1, 2]);
    expect(new Set(gangs[1]!.members.map((m) => m.worker_id))).toEqual(new Set([survivor, 'gang-spare']));
    // the second attempt resumed from a checkpoint of the first
    const claims = events.filter((e) => e.kind === 'claimed');
    expect(claims).toHaveLength(2);
    expect((claims[1]!.payload as { resume_checkpoint?: string }).resume_checkpoint).toMatch(/^checkpoint-/);

    // every step trained and reported once in the end, by rank 0 alone
    const metrics = await server.ok<Schemas['MetricPage']>(
      'GET',
      `/v1/training/jobs/${job.id}/metrics?limit=10000`,
    );
    const trainSteps = new Set(metrics.points.filter((p) => p.phase !== 'eval').map((p) => p.step));
    expect(trainSteps.size).toBe(MAX_STEPS);
    expect((await server.request('GET', '/v1/health')).status).toBe(200);
  });
});
