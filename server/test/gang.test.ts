/**
 * Gang scheduling (num_nodes > 1) over HTTP with fake workers: all or none, competing gangs do not
 * deadlock, and a lost member ends the attempt for every member. Assertions are on states and
 * recorded events; waits only let windows and leases lapse.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSweeper, type Sweeper } from '../src/queue/sweeper.js';
import { ALL_JOB_TYPES, type ClaimedJob, createFinetune, fakeWorker, sleep } from './fake-worker.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

const CPU = { job_types: ALL_JOB_TYPES, device: 'cpu' as const };

interface GangJoin {
  job_id: string;
  member_token: string;
  world: number;
  joined: number;
}
interface GangWait {
  state: 'forming' | 'started' | 'expired';
  world: number;
  joined: number;
  gang?: { rank: number; world: number; master_addr: string; master_port: number };
  job?: ClaimedJob;
}

/** A worker that can join gangs, hosting its rendezvous at 10.0.0.<n>:<29500 + n>. */
function gangWorker(server: TestServer, n: number) {
  const workerId = `node-${n}`;
  const base = fakeWorker(server, workerId);
  const post = (path: string, json: unknown) =>
    server.api(path, { key: server.workerToken, method: 'POST', json });
  return {
    ...base,
    workerId,
    address: { addr: `10.0.0.${n}`, port: 29500 + n },
    async claimGang(waitSeconds = 0): Promise<{ job?: ClaimedJob; gang?: GangJoin } | null> {
      const res = await post('/v1/workers/claim', {
        worker_id: workerId,
        capabilities: CPU,
        wait_seconds: waitSeconds,
        gang: { addr: `10.0.0.${n}`, port: 29500 + n },
      });
      if (res.status === 204) return null;
      if (res.status === 202) return { gang: (await res.json()) as GangJoin };
      expect(res.status).toBe(200);
      return (await res.json()) as { job: ClaimedJob };
    },
    wait: (jobId: string, token: string, waitSeconds = 0) =>
      post(`/v1/workers/jobs/${jobId}/gang/wait`, { member_token: token, wait_seconds: waitSeconds }),
    memberHeartbeat: (jobId: string, token: string) =>
      post(`/v1/workers/jobs/${jobId}/gang/heartbeat`, { member_token: token }),
  };
}

/**
 * A transaction of its own that locks job `id`'s row (as joinGang does) and holds it until
 * `release()`: `held` is its backend's pid once it holds the row, and fails if the transaction ended
 * first; `done` is the transaction's end.
 */
function holdJobRow(server: TestServer, id: string) {
  let release!: () => void;
  const released = new Promise<void>((resolve) => {
    release = resolve;
  });
  let holding!: (pid: number) => void;
  const holder = new Promise<number>((resolve) => {
    holding = resolve;
  });
  const done = server.ctx.knex.transaction(async (trx) => {
    await trx.raw('SELECT id FROM jobs WHERE id = ? FOR UPDATE', [id]);
    holding((await trx.raw('SELECT pg_backend_pid() AS pid')).rows[0].pid);
    await released;
  });
  const held = Promise.race([
    holder,
    done.then((): number => {
      throw new Error('the holding transaction ended before it held the row');
    }),
  ]);
  return { held, release, done };
}

async function waitJson(res: Response): Promise<GangWait> {
  expect(res.status).toBe(200);
  return (await res.json()) as GangWait;
}

async function jobOf(server: TestServer, id: string) {
  return (await (await server.api(`/v1/training/jobs/${id}`)).json()) as Record<string, unknown>;
}

async function eventsOf(server: TestServer, id: string) {
  const body = (await (await server.api(`/v1/training/jobs/${id}/events`)).json()) as {
    events: { kind: string; payload: Record<string, unknown> }[];
  };
  return body.events;
}

describe.each(DATABASES)('gang scheduling on %s', (db) => {
  let server: TestServer;
  let sweeper: Sweeper;
  beforeAll(async () => {
    // a long join window (nothing expires by accident here); 1 s leases for the lost-member test
    server = await startTestServer(db, { leaseSeconds: 1, sweepIntervalMs: 60_000, gangWindowSeconds: 60 });
    sweeper = createSweeper(server.ctx, { intervalMs: 60_000 });
  });
  afterAll(async () => {
    await sweeper?.stop();
    await server?.stop();
  });

  it('starts a gang only when all num_nodes workers joined; rank 0 holds the lease', async () => {
    const id = await createFinetune(server, { num_nodes: 3, priority: 90 });
    expect((await jobOf(server, id)).config).toMatchObject({ distributed: { enabled: true, num_nodes: 3 } });
    // a worker that cannot join gangs is never offered one
    expect(await fakeWorker(server, 'plain').claim(CPU)).toBeNull();

    const [w1, w2, w3] = [1, 2, 3].map((n) => gangWorker(server, n)) as [
      ReturnType<typeof gangWorker>,
      ReturnType<typeof gangWorker>,
      ReturnType<typeof gangWorker>,
    ];
    const j1 = (await w1.claimGang())!.gang!;
    expect(j1).toMatchObject({ job_id: id, world: 3, joined: 1 });
    expect(await waitJson(await w1.wait(id, j1.member_token))).toMatchObject({ state: 'forming', joined: 1 });
    const j2 = (await w2.claimGang())!.gang!;
    expect(j2).toMatchObject({ job_id: id, joined: 2 });
    // none: two of three joined, nothing is leased, no attempt began
    expect(await jobOf(server, id)).toMatchObject({ status: 'pending', attempt: 0 });
    expect((await eventsOf(server, id)).map((e) => e.kind)).not.toContain('claimed');
    // a worker already waiting in the gang is not offered it again
    expect(await w1.claimGang()).toBeNull();

    const j3 = (await w3.claimGang())!.gang!;
    expect(j3).toMatchObject({ job_id: id, joined: 3 });
    // all: the third join started the attempt
    expect(await jobOf(server, id)).toMatchObject({ status: 'running', attempt: 1 });

    const started = await Promise.all(
      [
        [w1, j1],
        [w2, j2],
        [w3, j3],
      ].map(async ([w, j]) => waitJson(await (w as typeof w1).wait(id, (j as GangJoin).member_token))),
    );
    expect(started.map((s) => [s.state, s.gang?.rank])).toEqual([
      ['started', 0],
      ['started', 1],
      ['started', 2],
    ]);
    for (const s of started) {
      expect(s.gang).toMatchObject({ world: 3, master_addr: '10.0.0.1', master_port: 29501 });
      expect(s.job).toMatchObject({ job_id: id, attempt: 1, spec: { distributed: { num_nodes: 3 } } });
    }
    expect(started[1]!.job!.lease_token).toBe(j2.member_token);

    const events = await eventsOf(server, id);
    expect(events.filter((e) => e.kind === 'claimed')).toHaveLength(1);
    const gangStarted = events.filter((e) => e.kind === 'gang_started');
    expect(gangStarted).toHaveLength(1);
    expect(gangStarted[0]!.payload).toMatchObject({
      attempt: 1,
      world: 3,
      master_addr: '10.0.0.1',
      members: [
        { rank: 0, worker_id: 'node-1' },
        { rank: 1, worker_id: 'node-2' },
        { rank: 2, worker_id: 'node-3' },
      ],
    });

    // rank 0's token is the job's lease; the others heartbeat their membership and may download
    expect((await w1.heartbeat(id, j1.member_token, { current_step: 1 })).status).toBe(200);
    expect((await w2.heartbeat(id, j2.member_token)).status).toBe(409);
    expect((await w2.memberHeartbeat(id, j2.member_token)).status).toBe(200);
    const input = started[1]!.job!.inputs[0]!;
    expect((await w2.download(input.download_url, j2.member_token)).status).toBe(200);
    expect((await w2.complete(id, j2.member_token)).status).toBe(409);

    // rank 0 completes; the attempt is over for every member
    expect((await w1.complete(id, j1.member_token, { loss_final: 0.5 })).status).toBe(200);
    expect(await jobOf(server, id)).toMatchObject({ status: 'completed' });
    for (const [w, j] of [
      [w2, j2],
      [w3, j3],
    ] as const) {
      const res = await w.memberHeartbeat(id, j.member_token);
      expect(res.status).toBe(409);
      expect((await res.json()).error.code).toBe('lease_lost');
    }
  });

  it('single-node jobs keep their path: a worker without gang support takes them past a gang job', async () => {
    const gangJob = await createFinetune(server, { num_nodes: 2, priority: 95 });
    const single = await createFinetune(server, { priority: 10 });
    const taken = (await fakeWorker(server, 'plain-2').claim(CPU))!;
    expect(taken.job_id).toBe(single);
    expect((await fakeWorker(server, 'plain-2').complete(single, taken.lease_token)).status).toBe(200);
    expect((await server.api(`/v1/training/jobs/${gangJob}/cancel`, { method: 'POST' })).status).toBe(200);
  });

  it('a lost member ends the attempt for all; the job goes back to pending and resumes', async () => {
    const id = await createFinetune(server, { num_nodes: 2, priority: 99 });
    const [w1, w2] = [4, 5].map((n) => gangWorker(server, n)) as [
      ReturnType<typeof gangWorker>,
      ReturnType<typeof gangWorker>,
    ];
    const j1 = (await w1.claimGang())!.gang!;
    const j2 = (await w2.claimGang())!.gang!;
    expect(j2.joined).toBe(2);
    expect((await waitJson(await w1.wait(id, j1.member_token))).state).toBe('started');
    expect((await waitJson(await w2.wait(id, j2.member_token))).state).toBe('started');
    const put = await w1.upload(id, j1.member_token, 'checkpoints', 'checkpoint-3', Buffer.from('state'), 3);
    expect(put.status).toBe(201);

    // rank 1 goes silent (kill -9); rank 0 keeps beating
    await sleep(1200);
    expect((await w1.heartbeat(id, j1.member_token)).status).toBe(200);
    expect(await sweeper.runOnce()).toEqual({ retried: 1, cancelled: 0, failed: 0 });

    expect(await jobOf(server, id)).toMatchObject({ status: 'pending', retries: 1, last_checkpoint_step: 3 });
    const kinds = (await eventsOf(server, id)).map((e) => e.kind);
    expect(kinds.slice(kinds.indexOf('gang_started'))).toEqual(
      expect.arrayContaining(['gang_member_lost', 'retry']),
    );
    const lost = (await eventsOf(server, id)).find((e) => e.kind === 'gang_member_lost')!;
    expect(lost.payload).toMatchObject({ attempt: 1, rank: 1, worker_id: 'node-5' });
    // every member is fenced out: rank 0's lease and rank 1's membership
    for (const res of [
      await w1.heartbeat(id, j1.member_token),
      await w2.memberHeartbeat(id, j2.member_token),
    ]) {
      expect(res.status).toBe(409);
      expect((await res.json()).error.code).toBe('lease_lost');
    }

    // a new gang forms for attempt 2 and resumes from the checkpoint
    const w3 = gangWorker(server, 6);
    const k1 = (await w1.claimGang())!.gang!;
    const k3 = (await w3.claimGang())!.gang!;
    const s1 = await waitJson(await w1.wait(id, k1.member_token));
    const s3 = await waitJson(await w3.wait(id, k3.member_token));
    expect([s1.gang?.rank, s3.gang?.rank]).toEqual([0, 1]);
    for (const s of [s1, s3]) {
      expect(s.job).toMatchObject({ attempt: 2, resume_from: { name: 'checkpoint-3', step: 3 } });
    }
    const resume = s3.job!.resume_from!;
    expect(await (await w3.download(resume.download_url, k3.member_token)).text()).toBe('state');
    expect((await w1.complete(id, k1.member_token, { loss_final: 0.1 })).status).toBe(200);
    expect(await jobOf(server, id)).toMatchObject({ status: 'completed', attempt: 2, retries: 1 });
  });
  // The claim read jobs FOR UPDATE SKIP LOCKED, gang jobs too: a worker claiming while another joined
  // the best gang (joinGang holds its row) was sent to a lesser gang, and competing gangs could split
  // their workers again and again (the competing-gangs test took 5–12 s on a loaded machine, once 60).
  it.runIf(db === 'postgres')('joins the best gang while another worker is joining it', async () => {
    const lesser = await createFinetune(server, { num_nodes: 2, priority: 50 });
    const best = await createFinetune(server, { num_nodes: 2, priority: 60 });
    // as joinGang does, in a transaction of its own
    const joining = holdJobRow(server, best);
    try {
      const pid = await joining.held;
      const [w1, w2] = [gangWorker(server, 1), gangWorker(server, 2)];
      let settled = false;
      const claim = w1.claimGang().finally(() => {
        settled = true;
      });
      // until the claim waits for that transaction (or, as before, answered at once with the lesser gang)
      const blocked = async () =>
        Number(
          (
            await server.ctx.knex.raw(
              'SELECT count(*) AS n FROM pg_stat_activity WHERE ? = ANY(pg_blocking_pids(pid))',
              [pid],
            )
          ).rows[0].n,
        ) > 0;
      while (!settled && !(await blocked())) await sleep(10);
      joining.release();
      const joined = (await claim)?.gang;
      expect(joined?.job_id).toBe(best);
      // the next worker completes that gang; its rank 0 ends the job
      expect((await w2.claimGang())?.gang?.job_id).toBe(best);
      expect((await jobOf(server, best)).status).toBe('running');
      expect((await w1.complete(best, joined!.member_token, { loss_final: 1 })).status).toBe(200);
    } finally {
      joining.release();
      await joining.done;
      await server.api(`/v1/training/jobs/${lesser}/cancel`, { method: 'POST' });
    }
    expect((await jobOf(server, lesser)).status).toBe('cancelled');
  });

  it.runIf(db === 'postgres')(
    "answers 500 when the gang stays locked past the join's wait, then joins it",
    async () => {
      const gang = await createFinetune(server, { num_nodes: 2 });
      // a transaction stuck while it holds the job's row
      const stuck = holdJobRow(server, gang);
      // were the claim to wait for the row (no lock timeout), it goes free after a while: 202, not 500
      const safety = setTimeout(() => stuck.release(), 15_000);
      try {
        await stuck.held;
        const w1 = gangWorker(server, 1);
        const res = await server.api('/v1/workers/claim', {
          key: server.workerToken,
          method: 'POST',
          json: { worker_id: w1.workerId, capabilities: CPU, wait_seconds: 0, gang: w1.address },
        });
        expect(res.status).toBe(500);
        expect(((await res.json()) as { error: { code: string } }).error.code).toBe('internal_error');
        stuck.release();
        await stuck.done;
        // nothing of the failed join stayed: the same worker joins once the row is free
        expect((await w1.claimGang())?.gang?.job_id).toBe(gang);
      } finally {
        clearTimeout(safety);
        stuck.release();
        await stuck.done;
        await server.api(`/v1/training/jobs/${gang}/cancel`, { method: 'POST' });
      }
      expect((await jobOf(server, gang)).status).toBe('cancelled');
    },
  );
});

describe.each(DATABASES)('competing gangs on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db, { gangWindowSeconds: 1 });
  });
  afterAll(async () => {
    await server?.stop();
  });

  it('two gangs that split three workers between them do not deadlock: both complete', async () => {
    const workers = [1, 2, 3].map((n) => gangWorker(server, n));
    const [w1, w2, w3] = workers as [
      ReturnType<typeof gangWorker>,
      ReturnType<typeof gangWorker>,
      ReturnType<typeof gangWorker>,
    ];
    // A (3 nodes) gets w1; then B (3 nodes, higher priority) arrives and gets w2 and w3:
    // neither gang can complete from the workers it holds.
    const a = await createFinetune(server, { num_nodes: 3, priority: 50 });
    const first = (await w1.claimGang())!.gang!;
    expect(first.job_id).toBe(a);
    const b = await createFinetune(server, { num_nodes: 3, priority: 60 });
    const held = new Map<number, GangJoin>([[0, first]]);
    for (const [i, w] of [
      [1, w2],
      [2, w3],
    ] as const) {
      const joined = (await w.claimGang())!.gang!;
      expect(joined.job_id).toBe(b);
      held.set(i, joined);
    }
    expect((await jobOf(server, a)).status).toBe('pending');
    expect((await jobOf(server, b)).status).toBe('pending');

    // Each worker: wait in its gang until it starts (rank 0 completes the job at once) or its window
    // passes (then claim again), until both jobs are done.
    const done = async () =>
      (await jobOf(server, a)).status === 'completed' && (await jobOf(server, b)).status === 'completed';
    const loop = async (i: number) => {
      const w = workers[i]!;
      let membership = held.get(i) ?? null;
      while (!(await done())) {
        if (!membership) {
          const claim = await w.claimGang(1);
          membership = claim?.gang ?? null;
          expect(claim?.job).toBeUndefined();
          continue;
        }
        const res = await w.wait(membership.job_id, membership.member_token, 1);
        if (res.status === 409) {
          membership = null; // removed from a gang whose window it outlived
          continue;
        }
        const answer = await waitJson(res);
        if (answer.state === 'forming') continue;
        if (answer.state === 'started' && answer.gang!.rank === 0) {
          const complete = await w.complete(membership.job_id, membership.member_token, { loss_final: 1 });
          expect(complete.status).toBe(200);
        }
        membership = null;
      }
    };
    await Promise.all([0, 1, 2].map(loop));

    for (const id of [a, b]) {
      const events = await eventsOf(server, id);
      const starts = events.filter((e) => e.kind === 'gang_started');
      expect(starts).toHaveLength(1);
      const members = starts[0]!.payload.members as { worker_id: string }[];
      expect(new Set(members.map((m) => m.worker_id))).toEqual(new Set(['node-1', 'node-2', 'node-3']));
    }
    // B, the higher priority, started first
    expect(String((await jobOf(server, b)).started_at) < String((await jobOf(server, a)).started_at)).toBe(
      true,
    );
  }, 60_000);
});
