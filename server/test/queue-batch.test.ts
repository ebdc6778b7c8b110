/**
 * Batched claims and completes over HTTP: many jobs per request, each with its own lease; and
 * single claims and completions that arrive together sharing one statement (queue/coalesce.ts).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { claimJobs } from '../src/queue/claim.js';
import { completeJob, completeJobs } from '../src/queue/complete.js';
import { type EnqueueInput, enqueueJob } from '../src/queue/enqueue.js';
import type { ClaimedJob } from './fake-worker.js';
import { finetuneInput } from './fixtures.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

const CPU = { job_types: ['finetune'], device: 'cpu' as const };
const GANG_ADDRESS = { addr: '127.0.0.1', port: 29500 };

describe.each(DATABASES)('batched claims and completes on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(async () => {
    await server?.stop();
  });

  const enqueue = async (overrides: Partial<EnqueueInput> = {}) =>
    (await enqueueJob(server.ctx, server.ctx.knex, finetuneInput(overrides))).id;

  /** Ends earlier tests' live jobs, so each test claims only what it made. */
  const drain = () =>
    server.ctx.knex('jobs').whereIn('status', ['pending', 'running']).update({ status: 'cancelled' });

  const claim = (body: Record<string, unknown>) =>
    server.api('/v1/workers/claim', {
      key: server.workerToken,
      method: 'POST',
      json: { worker_id: 'batcher', capabilities: CPU, wait_seconds: 0, ...body },
    });

  const claimBatch = async (maxJobs: number) => {
    const res = await claim({ max_jobs: maxJobs });
    if (res.status === 204) return [];
    expect(res.status).toBe(200);
    const answer = (await res.json()) as { job: ClaimedJob; jobs: ClaimedJob[] };
    expect(answer.job).toEqual(answer.jobs[0]);
    return answer.jobs;
  };

  it('a result Postgres refuses fails only its own item; the rest complete', async () => {
    await drain();
    const ids = [await enqueue(), await enqueue()];
    const [good, bad] = await claimBatch(2);
    expect([good!.job_id, bad!.job_id].sort()).toEqual([...ids].sort());
    const outcomes = await completeJobs(server.ctx, [
      { jobId: good!.job_id, leaseToken: good!.lease_token, result: { steps: 1 } },
      // a NUL in text: the jsonb cast fails (the HTTP routes refuse it before; the queue must not trip on it)
      { jobId: bad!.job_id, leaseToken: bad!.lease_token, result: { note: 'nul \u0000 here' } },
    ]);
    expect(outcomes[0]).toEqual({ jobId: good!.job_id });
    expect(outcomes[1]).toMatchObject({ jobId: bad!.job_id, error: { status: 500, code: 'internal_error' } });
    const statuses = await server.ctx.knex('jobs').whereIn('id', ids).pluck('status');
    expect(statuses.sort()).toEqual(['completed', 'running']);
  });

  it('leases up to max_jobs jobs in one claim, best first, each with its own lease, attempt and event', async () => {
    await drain();
    const low = await enqueue({ priority: 10 });
    const high = await enqueue({ priority: 90 });
    const mid = [await enqueue({ priority: 50 }), await enqueue({ priority: 50 })];
    const lowest = await enqueue({ priority: 1 });

    const first = await claimBatch(3);
    expect(first.map((j) => j.job_id)).toEqual([high, ...mid]);
    expect(new Set(first.map((j) => j.lease_token)).size).toBe(3);
    const rest = await claimBatch(32);
    expect(rest.map((j) => j.job_id)).toEqual([low, lowest]);
    expect(await claimBatch(32)).toEqual([]);

    const ids = [high, ...mid, low, lowest];
    const rows = await server.ctx.knex('jobs').whereIn('id', ids).select('id', 'status', 'lease_token');
    const tokens = new Map([...first, ...rest].map((j) => [j.job_id, j.lease_token]));
    for (const row of rows)
      expect(row).toEqual({ id: row.id, status: 'running', lease_token: tokens.get(row.id) });
    const attempts = await server.ctx
      .knex('job_attempts')
      .whereIn('job_id', ids)
      .select('job_id', 'lease_token');
    expect(attempts).toHaveLength(5);
    for (const a of attempts) expect(a.lease_token).toBe(tokens.get(a.job_id));
    const claimedEvents = await server.ctx
      .knex('job_events')
      .whereIn('job_id', ids)
      .where({ kind: 'claimed' });
    expect(claimedEvents.map((e) => e.job_id).sort()).toEqual([...ids].sort());
  });

  it('answers a claim without max_jobs as before: one job, no jobs list', async () => {
    await drain();
    const [a] = [await enqueue(), await enqueue()];
    const res = await claim({});
    expect(res.status).toBe(200);
    const answer = (await res.json()) as Record<string, unknown>;
    expect(Object.keys(answer)).toEqual(['job']);
    expect((answer.job as ClaimedJob).job_id).toBe(a);
    expect(await server.ctx.knex('jobs').where({ status: 'running' }).pluck('id')).toEqual([a]);
  });

  it('refuses max_jobs outside 1..32', async () => {
    for (const maxJobs of [0, 33, 1.5]) expect((await claim({ max_jobs: maxJobs })).status).toBe(400);
  });

  it('never batches gang jobs: a gang first answers 202, a gang further down ends the batch', async () => {
    await drain();
    const gangFirst = await enqueue({ priority: 90, numNodes: 2 });
    const single = await enqueue({ priority: 50 });
    const joined = await claim({ max_jobs: 8, gang: GANG_ADDRESS });
    expect(joined.status).toBe(202);
    expect(((await joined.json()) as { job_id: string }).job_id).toBe(gangFirst);
    expect(await server.ctx.knex('jobs').where({ id: single }).first('status')).toEqual({
      status: 'pending',
    });

    await drain();
    const before = await enqueue({ priority: 90 });
    const gangLater = await enqueue({ priority: 50, numNodes: 2 });
    const after = await enqueue({ priority: 10 });
    const res = await claim({ max_jobs: 8, gang: GANG_ADDRESS, worker_id: 'other' });
    expect(res.status).toBe(200);
    expect(((await res.json()) as { jobs: ClaimedJob[] }).jobs.map((j) => j.job_id)).toEqual([before]);
    const statuses = await server.ctx.knex('jobs').whereIn('id', [gangLater, after]).select('id', 'status');
    expect(statuses.every((s) => s.status === 'pending')).toBe(true);
  });

  const completeBatch = async (completions: { job_id: string; lease_token: string; result?: object }[]) => {
    const res = await server.api('/v1/workers/jobs/complete', {
      key: server.workerToken,
      method: 'POST',
      json: { completions: completions.map((c) => ({ result: { loss_final: 0.5 }, ...c })) },
    });
    expect(res.status).toBe(200);
    return ((await res.json()) as { results: unknown[] }).results;
  };

  it('completes each job of a batch on its own lease: a stale one fails alone, a retried batch answers the same', async () => {
    await drain();
    const ids = [await enqueue(), await enqueue(), await enqueue()];
    const [a, b, c] = await claimBatch(3);
    // b's lease moves on: released, then leased again by another worker
    const released = await server.api(`/v1/workers/jobs/${b!.job_id}/release`, {
      key: server.workerToken,
      method: 'POST',
      json: { lease_token: b!.lease_token },
    });
    expect(released.status).toBe(200);
    const again = await claim({ worker_id: 'other', max_jobs: 1 });
    const bNow = ((await again.json()) as { job: ClaimedJob }).job;
    expect(bNow).toMatchObject({ job_id: b!.job_id, attempt: 2 });

    const batch = [
      { job_id: a!.job_id, lease_token: a!.lease_token },
      { job_id: b!.job_id, lease_token: b!.lease_token },
      { job_id: 'job_never_existed', lease_token: 'lease_x' },
      { job_id: c!.job_id, lease_token: c!.lease_token },
    ];
    const expected = [
      { job_id: a!.job_id, status: 'completed' },
      { job_id: b!.job_id, error: { code: 'lease_lost', message: expect.any(String), param: 'lease_token' } },
      { job_id: 'job_never_existed', error: expect.objectContaining({ code: 'job_not_found' }) },
      { job_id: c!.job_id, status: 'completed' },
    ];
    expect(await completeBatch(batch)).toEqual(expected);
    // the first answer was lost: the same batch again changes nothing and answers the same
    expect(await completeBatch(batch)).toEqual(expected);

    const rows = await server.ctx
      .knex('jobs')
      .whereIn('id', ids)
      .select('id', 'status', 'lease_token', 'adapter_name', 'output_model_id', 'results');
    const byId = new Map(rows.map((r) => [r.id, r]));
    for (const done of [a!, c!]) {
      const row = byId.get(done.job_id)!;
      expect(row).toMatchObject({ status: 'completed', results: { loss_final: 0.5 } });
      const adapters = await server.ctx.knex('adapters').where({ job_id: done.job_id }).pluck('name');
      expect(adapters).toEqual([row.adapter_name]);
      const models = await server.ctx.knex('models').where({ job_id: done.job_id }).pluck('id');
      expect(models).toEqual([row.output_model_id]);
      const ended = await server.ctx.knex('job_attempts').where({ job_id: done.job_id }).pluck('outcome');
      expect(ended).toEqual(['completed']);
    }
    expect(byId.get(b!.job_id)).toMatchObject({ status: 'running', lease_token: bNow.lease_token });
    const completedEvents = await server.ctx
      .knex('job_events')
      .whereIn('job_id', ids)
      .where({ kind: 'completed' })
      .pluck('job_id');
    expect(completedEvents.sort()).toEqual([a!.job_id, c!.job_id].sort());
  });

  it.each([
    ['the stale one first', true],
    ['the current one first', false],
  ])(
    'completes the current lease of a job a batch names twice (%s), however stale what this server kept of it',
    async (_, staleFirst) => {
      await drain();
      const id = await enqueue();
      const [stale] = await claimBatch(1);
      expect(stale!.job_id).toBe(id);
      // its lease lapsed and another server leased it again: this server never heard of that lease
      const current = 'lease_from_another_server';
      await server.ctx.knex('jobs').where({ id }).update({ lease_token: current });
      await server.ctx.knex('job_attempts').where({ job_id: id }).update({ lease_token: current });
      const tokens = staleFirst ? [stale!.lease_token, current] : [current, stale!.lease_token];
      const outcomes = await completeJobs(
        server.ctx,
        tokens.map((leaseToken) => ({ jobId: id, leaseToken, result: { steps: 1 } })),
      );
      const byToken = new Map(tokens.map((token, i) => [token, outcomes[i]]));
      expect(byToken.get(current)).toEqual({ jobId: id });
      expect(byToken.get(stale!.lease_token)).toMatchObject({ error: { code: 'lease_lost' } });
      expect(await server.ctx.knex('jobs').where({ id }).first('status')).toEqual({ status: 'completed' });
    },
  );

  it('registers each job of a batch under its own adapter name when two ask for the same one', async () => {
    await drain();
    await enqueue({ config: { output_name: 'twin' } });
    await enqueue({ config: { output_name: 'twin' } });
    const jobs = await claimBatch(2);
    const results = await completeBatch(jobs.map((j) => ({ job_id: j.job_id, lease_token: j.lease_token })));
    expect(results).toEqual(jobs.map((j) => ({ job_id: j.job_id, status: 'completed' })));
    const names = await server.ctx
      .knex('jobs')
      .whereIn(
        'id',
        jobs.map((j) => j.job_id),
      )
      .pluck('adapter_name');
    expect(new Set(names).size).toBe(2);
    expect(names).toContain('twin');
  });

  it('refuses an empty batch and one of more than 32', async () => {
    const one = { job_id: 'job_x', lease_token: 'lease_x', result: {} };
    for (const completions of [[], Array.from({ length: 33 }, () => one)]) {
      const res = await server.api('/v1/workers/jobs/complete', {
        key: server.workerToken,
        method: 'POST',
        json: { completions },
      });
      expect(res.status).toBe(400);
    }
  });

  it('claims that arrive while one is in flight share the next statement, each leased to its own worker', async () => {
    await drain();
    const ids: string[] = [];
    for (let i = 0; i < 6; i++) ids.push(await enqueue({ priority: 60 - i }));
    // Started in one tick: the first claim's statement is in flight when the others arrive.
    const workers = ['w0', 'w1', 'w2', 'w3', 'w3', 'w5', 'w6'];
    const claims = await Promise.all(
      workers.map((workerId) => claimJobs(server.ctx, { workerId, capabilities: CPU }, 1)),
    );
    // Best first, in order of arrival; the seventh finds none left.
    expect(claims.map((rows) => rows.map((row) => row.id))).toEqual([...ids.map((id) => [id]), []]);
    const rows = await server.ctx
      .knex('jobs')
      .whereIn('id', ids)
      .orderBy('priority', 'desc')
      .select('lease_owner', 'lease_token', server.ctx.knex.raw('xmin::text AS xid'));
    expect(rows.map((row) => row.lease_owner)).toEqual(workers.slice(0, 6));
    expect(rows.map((row) => row.lease_token)).toEqual(claims.slice(0, 6).map((c) => c[0]!.lease_token));
    // One statement, one transaction (the rows' xmin): the first claim went alone, the rest together.
    const transactions = rows.map((row) => row.xid);
    expect(new Set(transactions).size).toBe(2);
    expect(new Set(transactions.slice(1)).size).toBe(1);
    const attempts = await server.ctx.knex('job_attempts').whereIn('job_id', ids).orderBy('job_id');
    const events = await server.ctx.knex('job_events').whereIn('job_id', ids).where({ kind: 'claimed' });
    const ownerOf = new Map(rows.map((row, i) => [ids[i], row.lease_owner]));
    for (const attempt of attempts) expect(attempt.worker_id).toBe(ownerOf.get(attempt.job_id));
    for (const event of events) expect(event.payload.worker_id).toBe(ownerOf.get(event.job_id));
    expect(attempts).toHaveLength(6);
    expect(events).toHaveLength(6);
  });

  it('claims of other capabilities do not share a statement', async () => {
    await drain();
    const finetunes = [await enqueue({ priority: 90 }), await enqueue({ priority: 80 }), await enqueue()];
    // The merger's claim joins no finetune claim's statement: were it added to one, it would get a finetune.
    const [first, second, merger] = await Promise.all([
      claimJobs(server.ctx, { workerId: 'w1', capabilities: CPU }, 1),
      claimJobs(server.ctx, { workerId: 'w2', capabilities: CPU }, 1),
      claimJobs(
        server.ctx,
        { workerId: 'merger', capabilities: { job_types: ['merge'], device: 'cpu' as const } },
        1,
      ),
    ]);
    expect([...first!, ...second!].map((row) => row.id)).toEqual(finetunes.slice(0, 2));
    expect(merger).toEqual([]);
  });

  it('claims whose worker hung up while they waited lease nothing', async () => {
    await drain();
    const ids = [await enqueue({ priority: 90 }), await enqueue()];
    const hungUp = new AbortController();
    const waiting = [
      claimJobs(server.ctx, { workerId: 'w1', capabilities: CPU }, 1),
      claimJobs(server.ctx, { workerId: 'gone', capabilities: CPU }, 1, hungUp.signal),
    ];
    hungUp.abort(); // while the first claim's statement runs
    const [first, gone] = await Promise.all(waiting);
    expect(first!.map((row) => row.id)).toEqual([ids[0]]);
    expect(gone).toEqual([]);
    expect(await server.ctx.knex('jobs').where({ id: ids[1] }).first('status')).toEqual({
      status: 'pending',
    });
  });

  it('completions that arrive together share a statement, and each gets its own answer', async () => {
    await drain();
    const ids = [await enqueue(), await enqueue(), await enqueue()];
    const [a, b, c] = await claimBatch(3);
    const result = { steps: 1 };
    // a goes alone; the rest wait for it and go together
    const answers = await Promise.allSettled([
      completeJob(server.ctx, a!.job_id, a!.lease_token, result),
      completeJob(server.ctx, b!.job_id, b!.lease_token, result),
      completeJob(server.ctx, c!.job_id, c!.lease_token, result),
      completeJob(server.ctx, b!.job_id, 'lease_stale', result),
      completeJob(server.ctx, c!.job_id, c!.lease_token, result), // a resend
    ]);
    expect(answers.map((answer) => answer.status)).toEqual([
      'fulfilled',
      'fulfilled',
      'fulfilled',
      'rejected',
      'fulfilled',
    ]);
    expect((answers[3] as PromiseRejectedResult).reason).toMatchObject({ status: 409, code: 'lease_lost' });
    const rows = await server.ctx
      .knex('jobs')
      .whereIn('id', ids)
      .select('id', 'status', server.ctx.knex.raw('xmin::text AS xid'));
    const byId = new Map(rows.map((row) => [row.id, row]));
    const [first, second, third] = [a, b, c].map((job) => byId.get(job!.job_id)!);
    expect([first, second, third].map((row) => row!.status)).toEqual(['completed', 'completed', 'completed']);
    expect(second!.xid).toBe(third!.xid);
    expect(first!.xid).not.toBe(second!.xid);
  });

  it('a completion Postgres refuses in a shared statement fails as it would alone; the others complete', async () => {
    await drain();
    const ids = [await enqueue(), await enqueue(), await enqueue()];
    const [a, b, c] = await claimBatch(3);
    const answers = await Promise.allSettled([
      completeJob(server.ctx, a!.job_id, a!.lease_token, { steps: 1 }),
      completeJob(server.ctx, b!.job_id, b!.lease_token, { steps: 1 }),
      // a fraction where the model's parameter count (bigint) goes: the shared statement fails
      completeJob(server.ctx, c!.job_id, c!.lease_token, { params_after: 1.5 }),
    ]);
    expect(answers.map((answer) => answer.status)).toEqual(['fulfilled', 'fulfilled', 'rejected']);
    // Postgres's own error, which app.ts answers with 400 (not a 500 the worker would retry)
    expect((answers[2] as PromiseRejectedResult).reason).toMatchObject({ code: '22P02' });
    const statuses = await server.ctx.knex('jobs').whereIn('id', ids).orderBy('id').pluck('status');
    expect(statuses.sort()).toEqual(['completed', 'completed', 'running']);
  });
});
