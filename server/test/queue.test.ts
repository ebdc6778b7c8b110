import { EventEmitter } from 'node:events';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { newId } from '../src/ids.js';
import { cancelJob } from '../src/queue/cancel.js';
import { type ClaimInput, claimJobWithWait, claimNextJob } from '../src/queue/claim.js';
import { type EnqueueInput, enqueueJob } from '../src/queue/enqueue.js';
import { failJob, retryDelaySeconds } from '../src/queue/fail.js';
import { heartbeatJob } from '../src/queue/heartbeat.js';
import { createSweeper, validateSweeperConfig } from '../src/queue/sweeper.js';
import type { JobRow } from '../src/queue/types.js';
import { sleep } from './fake-worker.js';
import { finetuneInput } from './fixtures.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

const cpuWorker = (workerId: string): ClaimInput => ({
  workerId,
  capabilities: { job_types: ['finetune'], device: 'cpu' },
});

describe('retry backoff', () => {
  const ctx = { config: { retryBaseSeconds: 10, retryMaxSeconds: 600 } } as Parameters<
    typeof retryDelaySeconds
  >[0];
  it('doubles from the base and stops at the cap', () => {
    expect([1, 2, 3, 4, 7, 20].map((attempt) => retryDelaySeconds(ctx, attempt))).toEqual([
      10, 20, 40, 80, 600, 600,
    ]);
  });
});

describe('sweeper config', () => {
  it('applies defaults and refuses values that would spin', () => {
    expect(validateSweeperConfig({})).toEqual({ intervalMs: 5000, batchSize: 100 });
    expect(() => validateSweeperConfig({ intervalMs: 0 })).toThrow(/intervalMs/);
    expect(() => validateSweeperConfig({ batchSize: 0 })).toThrow(/batchSize/);
  });
});

describe.each(DATABASES)('queue on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    // The background sweeper is slowed down so the tests drive rescues themselves.
    server = await startTestServer(db, {
      leaseSeconds: 1,
      sweepIntervalMs: 60_000,
      retryBaseSeconds: 2,
      // $1 a second makes billed time easy to read
      pricePerGpuHour: 3600,
    });
  });
  afterAll(async () => {
    await server?.stop();
  });

  const enqueue = async (overrides: Partial<EnqueueInput> = {}) =>
    enqueueJob(server.ctx, server.ctx.knex, finetuneInput(overrides));

  /** Ends earlier tests' live jobs, so no test claims or rescues another's leftovers. */
  const drain = async () => {
    await server.ctx.knex('jobs').whereIn('status', ['pending', 'running']).update({ status: 'cancelled' });
  };

  it('signals once per committed transaction, with how many jobs it enqueued', async () => {
    // The in-process signal, counted: what a LISTENing server process relays NOTIFYs to.
    const queueSignal = new EventEmitter();
    const signals: number[] = [];
    queueSignal.on('job-available', (count: number) => signals.push(count));
    const counting = { ...server.ctx, dbKind: 'pglite' as const, queueSignal };
    const input = () => ({
      id: newId('job'),
      tenantId: 'default',
      kind: 'training' as const,
      type: 'finetune',
      config: {},
    });
    const settled = () => new Promise((resolve) => setImmediate(resolve));

    await server.ctx.knex.transaction(async (trx) => {
      for (let i = 0; i < 5; i++) await enqueueJob(counting, trx, input());
    });
    await settled();
    expect(signals).toEqual([5]); // one signal, for 5 jobs: up to 5 waiting claims wake
    await server.ctx.knex
      .transaction(async (trx) => {
        await enqueueJob(counting, trx, input());
        throw new Error('roll back');
      })
      .catch(() => {});
    await settled();
    expect(signals).toEqual([5]); // a rolled-back transaction wakes nobody
    await enqueueJob(counting, server.ctx.knex, input());
    await settled();
    expect(signals).toEqual([5, 1]);
    await drain();
  });

  it('hands each of 200 jobs to exactly one of 8 concurrent claimers', async () => {
    await drain();
    const ids = new Set<string>();
    for (let i = 0; i < 200; i++) ids.add((await enqueue({ priority: i % 3 })).id);
    const claimer = async (n: number) => {
      const mine: string[] = [];
      for (;;) {
        const job = await claimNextJob(server.ctx, cpuWorker(`w${n}`));
        if (!job) return mine;
        mine.push(job.id);
      }
    };
    const claimed = (await Promise.all(Array.from({ length: 8 }, (_, n) => claimer(n)))).flat();
    expect(claimed).toHaveLength(200);
    expect(new Set(claimed)).toEqual(ids);
    const attempts = await server.ctx
      .knex('job_attempts')
      .whereIn('job_id', [...ids])
      .count({ n: '*' });
    expect(Number(attempts[0]!.n)).toBe(200);
  });

  it('claims the highest priority first, then the oldest', async () => {
    await drain();
    const low = await enqueue({ priority: 10 });
    const high = await enqueue({ priority: 90 });
    const lowLater = await enqueue({ priority: 10 });
    const order = [];
    for (let i = 0; i < 3; i++) order.push((await claimNextJob(server.ctx, cpuWorker('w')))!.id);
    expect(order).toEqual([high.id, low.id, lowLater.id]);
  });

  it('matches type, method and device to the worker', async () => {
    await drain();
    const qlora = await enqueue({ method: 'qlora' });
    const cuda = await enqueue({ requiredDevice: 'cuda' });
    const merge = await enqueue({ type: 'merge', method: null });
    const loraOnly: ClaimInput = {
      workerId: 'w',
      capabilities: { job_types: ['finetune'], methods: ['lora'], device: 'cpu' },
    };
    expect(await claimNextJob(server.ctx, loraOnly)).toBeNull();
    const gpu: ClaimInput = {
      workerId: 'g',
      capabilities: { job_types: ['finetune', 'merge'], methods: ['lora', 'qlora'], device: 'cuda' },
    };
    const got = [];
    for (let i = 0; i < 3; i++) got.push((await claimNextJob(server.ctx, gpu))!.id);
    expect(got.sort()).toEqual([qlora.id, cuda.id, merge.id].sort());
  });

  it('backs a retryable failure off, then hands it out again; exhausted attempts fail', async () => {
    await drain();
    const job = await enqueue({ maxAttempts: 2 });
    const first = (await claimNextJob(server.ctx, cpuWorker('w')))!;
    const failed = await failJob(server.ctx, job.id, first.lease_token!, {
      code: 'oom',
      message: 'x',
      retryable: true,
    });
    expect(failed.status).toBe('pending');
    const { rows } = await server.ctx.knex.raw(
      `SELECT EXTRACT(EPOCH FROM run_at - now()) AS wait FROM jobs WHERE id = ?`,
      [job.id],
    );
    expect(Number(rows[0].wait)).toBeGreaterThan(0.3);
    expect(await claimNextJob(server.ctx, cpuWorker('w'))).toBeNull();
    await sleep(2100);
    const second = (await claimNextJob(server.ctx, cpuWorker('w')))!;
    expect(second).toMatchObject({ id: job.id, attempt: 2 });
    const final = await failJob(server.ctx, job.id, second.lease_token!, {
      code: 'oom',
      message: 'again',
      retryable: true,
    });
    expect(final).toMatchObject({ status: 'failed', error_code: 'oom', error_message: 'again' });
    const outcomes = await server.ctx
      .knex('job_attempts')
      .where({ job_id: job.id })
      .orderBy('attempt')
      .pluck('outcome');
    expect(outcomes).toEqual(['retry', 'failed']);
  });

  it('fails a non-retryable error at once', async () => {
    await drain();
    const job = await enqueue();
    const claimed = (await claimNextJob(server.ctx, cpuWorker('w')))!;
    const failed = await failJob(server.ctx, job.id, claimed.lease_token!, {
      code: 'invalid_config',
      message: 'no',
      retryable: false,
    });
    expect(failed).toMatchObject({ status: 'failed', error_code: 'invalid_config', attempt: 1 });
  });

  it('ends a retryable failure cancelled when a cancel was asked, also one that commits meanwhile', async () => {
    await drain();
    const failure = { code: 'oom', message: 'x', retryable: true };
    const sequential = await enqueue();
    const first = (await claimNextJob(server.ctx, cpuWorker('w')))!;
    await cancelJob(server.ctx, 'default', 'training', sequential.id);
    expect(await failJob(server.ctx, sequential.id, first.lease_token!, failure)).toMatchObject({
      status: 'cancelled',
    });
    // The race needs two connections; PGlite has one, so there nothing runs in between.
    if (db !== 'postgres') return;
    const racing = await enqueue();
    const second = (await claimNextJob(server.ctx, cpuWorker('w')))!;
    // The user's cancel has updated the row but not committed when the worker's failure arrives.
    const cancel = await server.ctx.knex.transaction();
    await cancel('jobs').where({ id: racing.id }).update({ cancel_requested: true });
    const failing = failJob(server.ctx, racing.id, second.lease_token!, failure);
    const waiting = () =>
      server.ctx.knex.raw(
        `SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`,
      );
    while ((await waiting()).rows.length === 0) await sleep(10);
    await cancel.commit();
    expect(await failing).toMatchObject({ status: 'cancelled', cancel_requested: true });
  });

  // The hang-up must come while the statement runs: a second connection holds it back (not on PGlite).
  it.skipIf(db !== 'postgres')('releases what a claim leased when its caller hung up meanwhile', async () => {
    await drain();
    const job = await enqueue();
    const blocker = await server.ctx.knex.transaction();
    const caller = new AbortController();
    let claiming: Promise<unknown> | undefined;
    try {
      await blocker.raw('LOCK TABLE job_events IN EXCLUSIVE MODE');
      claiming = claimJobWithWait(server.ctx, cpuWorker('gone'), 0, caller.signal);
      // the claim's statement waits for the lock
      const waiting = () =>
        server.ctx.knex.raw(`SELECT 1 FROM pg_locks WHERE NOT granted AND relation = 'job_events'::regclass`);
      while ((await waiting()).rows.length === 0) await sleep(10);
      caller.abort();
    } finally {
      await blocker.commit();
    }
    expect(await claiming).toBeNull();
    expect(await server.ctx.knex('jobs').where({ id: job.id }).first()).toMatchObject({
      status: 'pending',
      attempt: 1,
      max_attempts: job.max_attempts + 1,
    });
    const attempts = await server.ctx.knex('job_attempts').where({ job_id: job.id }).select('outcome');
    expect(attempts).toEqual([{ outcome: 'released' }]);
    const events = await server.ctx.knex('job_events').where({ job_id: job.id }).orderBy('seq');
    expect(events.slice(-2).map((e) => e.kind)).toEqual(['claimed', 'released']);
    // the worker never saw the job: the server handed it back
    expect(events.at(-1).payload.by).toBe('server');
    // the next worker gets it at once
    expect((await claimNextJob(server.ctx, cpuWorker('w')))?.id).toBe(job.id);
  });

  it('rescues expired leases in runOnce: back to pending with retries + 1, or cancelled when asked', async () => {
    await drain();
    const sweeper = createSweeper(server.ctx, { intervalMs: 60_000, batchSize: 1 });
    try {
      const lapsing = await enqueue();
      const cancelling = await enqueue();
      const a = (await claimNextJob(server.ctx, cpuWorker('w')))!;
      const b = (await claimNextJob(server.ctx, cpuWorker('w')))!;
      const toCancel = a.id === cancelling.id ? a : b;
      await cancelJob(server.ctx, 'default', 'training', toCancel.id);
      await sleep(1200);
      expect(await sweeper.runOnce()).toEqual({ retried: 1, cancelled: 1, failed: 0 });
      const rows = (await server.ctx.knex('jobs').whereIn('id', [lapsing.id, cancelling.id])) as JobRow[];
      const byId = new Map(rows.map((r) => [r.id, r]));
      expect(byId.get(lapsing.id)).toMatchObject({ status: 'pending', retries: 1 });
      expect(byId.get(cancelling.id)).toMatchObject({ status: 'cancelled', retries: 0 });
      const outcome = await server.ctx.knex('job_attempts').where({ job_id: lapsing.id }).first('outcome');
      expect(outcome.outcome).toBe('lease_expired');
      await expect(
        heartbeatJob(server.ctx, lapsing.id, (a.id === lapsing.id ? a : b).lease_token!),
      ).rejects.toMatchObject({
        status: 409,
        code: 'lease_lost',
      });
    } finally {
      await sweeper.stop();
    }
  });

  it('bills the time a worker holds a live lease, at each heartbeat and at the end', async () => {
    await drain();
    const job = await enqueue();
    const claimed = (await claimNextJob(server.ctx, cpuWorker('w')))!;
    await sleep(600);
    await heartbeatJob(server.ctx, job.id, claimed.lease_token!);
    const afterHeartbeat = Number((await server.ctx.knex('jobs').where({ id: job.id }).first()).cost_accrued);
    expect(afterHeartbeat).toBeGreaterThanOrEqual(0.5);
    expect(afterHeartbeat).toBeLessThan(10);
    await sleep(300);
    const failed = await failJob(server.ctx, job.id, claimed.lease_token!, {
      code: 'x',
      message: 'y',
      retryable: false,
    });
    expect(Number(failed.cost_accrued)).toBeGreaterThanOrEqual(afterHeartbeat + 0.2);
  });

  it('rescues on its own clock once started', async () => {
    await drain();
    const job = await enqueue();
    await claimNextJob(server.ctx, cpuWorker('w'));
    const sweeper = createSweeper(server.ctx, { intervalMs: 50 });
    try {
      const deadline = Date.now() + 15_000;
      while ((await server.ctx.knex('jobs').where({ id: job.id }).first()).status !== 'pending') {
        if (Date.now() > deadline) throw new Error('the sweeper never rescued the job');
        await sleep(50);
      }
    } finally {
      await sweeper.stop();
    }
  });

  it('ends a job that loses its lease on its last attempt as failed', async () => {
    await drain();
    const job = await enqueue({ maxAttempts: 1 });
    await claimNextJob(server.ctx, cpuWorker('w'));
    await sleep(1200);
    const sweeper = createSweeper(server.ctx, { intervalMs: 60_000 });
    expect(await sweeper.runOnce()).toMatchObject({ failed: 1 });
    await sweeper.stop();
    expect(await server.ctx.knex('jobs').where({ id: job.id }).first()).toMatchObject({
      status: 'failed',
      error_code: 'lease_expired',
    });
  });
});
