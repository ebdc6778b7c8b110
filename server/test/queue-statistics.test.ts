/**
 * The claim's plan after a burst of jobs. A database that has never seen its queue full (a new one,
 * or statistics from a quiet hour) makes Postgres think few jobs are pending; planned on that, a
 * claim reads and sorts every pending row (5 ms a claim at 2,000 pending). A burst is therefore
 * followed by an ANALYZE, and the claim reads the claim-order index, taking the first job that fits.
 * Once those jobs are claimed, the statistics still say none runs: the statements that find a leased
 * job by its id read that job alone all the same.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { runPrepared } from '../src/prepared.js';
import { CLAIM_STATEMENTS, claimJobs } from '../src/queue/claim.js';
import { COMPLETE_JOBS } from '../src/queue/complete.js';
import { type EnqueueInput, enqueueJob } from '../src/queue/enqueue.js';
import { failJob } from '../src/queue/fail.js';
import { heartbeatJob } from '../src/queue/heartbeat.js';
import { reportLogs } from '../src/queue/report-logs.js';
import { analyzing, BURST_JOBS } from '../src/queue/statistics.js';
import type { ClaimedJobRow } from '../src/queue/types.js';
import { finetuneInput } from './fixtures.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

interface PlanNode {
  'Node Type': string;
  'Index Name'?: string;
  'Subplan Name'?: string;
  'Relation Name'?: string;
  'Actual Rows'?: number;
  'Rows Removed by Filter'?: number;
  'Actual Loops'?: number;
  Plans?: PlanNode[];
}

const flatten = (node: PlanNode): PlanNode[] => [node, ...(node.Plans ?? []).flatMap(flatten)];

describe.each(DATABASES)('queue statistics on %s', (db) => {
  // a server (and database) per test: each starts from statistics that know nothing of its jobs
  let server: TestServer;
  beforeEach(async () => {
    server = await startTestServer(db);
  });
  afterEach(async () => {
    await server?.stop();
  });

  const enqueueInOne = (jobs: EnqueueInput[]) =>
    server.ctx.knex.transaction(async (trx) => {
      for (const input of jobs) await enqueueJob(server.ctx, trx, input);
    });

  /** The plan of the part of a one-job claim that picks the job (the `next` CTE). */
  async function pickPlan(): Promise<PlanNode[]> {
    const knex = server.ctx.knex;
    await knex.raw(`PREPARE claim_plan AS ${CLAIM_STATEMENTS.solo[0]!.text}`);
    try {
      const result = await knex.raw(
        `EXPLAIN (FORMAT JSON) EXECUTE claim_plan('{finetune}', true, '{}', 'cpu', '{w1}', '{lease_x}', 60)`,
      );
      const [{ Plan: plan }] = result.rows[0]['QUERY PLAN'] as [{ Plan: PlanNode }];
      const next = flatten(plan).find((node) => node['Subplan Name'] === 'CTE next');
      expect(next, 'the claim statement picks its jobs in a CTE named next').toBeDefined();
      return flatten(next!);
    } finally {
      await knex.raw('DEALLOCATE claim_plan');
    }
  }

  /** What the planner's statistics say `jobs` holds, once the ANALYZE in progress (if any) is done. */
  async function jobsInStatistics(): Promise<number> {
    // the ANALYZE starts once the commit is known (a promise callback), then runs on its own
    await new Promise(setImmediate);
    await analyzing(server.ctx);
    const { rows } = await server.ctx.knex.raw(`SELECT reltuples FROM pg_class WHERE relname = 'jobs'`);
    return Number(rows[0].reltuples);
  }

  it('refreshes the statistics after jobs created one at a time, every BURST_JOBS of them', async () => {
    for (let i = 0; i < BURST_JOBS; i++) await enqueueJob(server.ctx, server.ctx.knex, finetuneInput());
    expect(await jobsInStatistics()).toBeGreaterThanOrEqual(BURST_JOBS);
  });

  it('refreshes the statistics once a burst commits, and the claim then reads the claim-order index', async () => {
    await enqueueInOne(Array.from({ length: 4 * BURST_JOBS }, () => finetuneInput()));
    expect(await jobsInStatistics()).toBeGreaterThanOrEqual(4 * BURST_JOBS);

    const nodes = await pickPlan();
    const types = nodes.map((node) => node['Node Type']);
    expect(nodes.find((node) => node['Node Type'] === 'Index Scan')?.['Index Name']).toBe('jobs_runnable');
    expect(types).not.toContain('Sort');
    expect(types).not.toContain('Bitmap Heap Scan');
  });

  it('settles on one plan per connection for every batch size, for workers in gangs or not', async () => {
    await enqueueInOne(Array.from({ length: 4 * BURST_JOBS }, () => finetuneInput()));
    await jobsInStatistics();
    // One connection; each claim rolled back, so every run finds the same queue. Postgres plans a
    // prepared statement for its values five times, then keeps the generic plan unless that looks
    // dearer: a claim planned anew each time costs more than it takes to run.
    await server.ctx.knex.transaction(async (trx) => {
      for (const [family, statements] of Object.entries(CLAIM_STATEMENTS)) {
        const size = 16;
        const workers = `'{${Array.from({ length: size }, (_, i) => `w${i}`).join(',')}}'`;
        const tokens = `'{${Array.from({ length: size }, (_, i) => `lease_${i}`).join(',')}}'`;
        await trx.raw(`PREPARE claim_plan AS ${statements[size - 1]!.text}`);
        for (let run = 0; run < 8; run++) {
          await trx.raw('SAVEPOINT claim');
          await trx.raw(
            `EXECUTE claim_plan('{finetune}', false, '{lora}', 'cpu', ${workers}, ${tokens}, 60)`,
          );
          await trx.raw('ROLLBACK TO SAVEPOINT claim');
        }
        const { rows } = await trx.raw(
          `SELECT generic_plans::int AS generic FROM pg_prepared_statements WHERE name = 'claim_plan'`,
        );
        expect(rows[0].generic, `${family} claims of ${size} jobs`).toBeGreaterThan(0);
        await trx.raw('DEALLOCATE claim_plan');
      }
    });
  });

  /** The tables that grow with every job: a statement about one job reads one row of each. */
  const QUEUE_TABLES = ['jobs', 'job_attempts', 'adapters', 'models'];

  /** Each scan of a queue table in a statement: the rows it read in all (kept or filtered out). */
  interface QueueRead {
    scan: string;
    statement: string;
    rows: number;
  }
  let explained = 0;

  /** A job as a lease names it: its id and its attempt's token. */
  type Lease = Pick<ClaimedJobRow, 'id' | 'lease_token'>;

  /**
   * The statements `action` runs through knex about job `ran` (captured), each then run again about
   * job `explain` instead (EXPLAIN ANALYZE, rolled back): `ran` may no longer be running by then.
   */
  async function queueReadsOf(
    ran: Lease,
    explain: Lease,
    action: () => Promise<unknown>,
  ): Promise<QueueRead[]> {
    const knex = server.ctx.knex;
    const statements: { sql: string; bindings: unknown[] }[] = [];
    const listen = (query: { sql: string; bindings?: unknown[] }) =>
      statements.push({ sql: query.sql, bindings: query.bindings ?? [] });
    knex.on('query', listen);
    try {
      await action();
    } finally {
      knex.off('query', listen);
    }
    const about = statements.filter(({ bindings }) => bindings.includes(ran.id));
    expect(about.length, 'statements about the job').toBeGreaterThan(0);
    const swap = new Map<unknown, unknown>([
      [ran.id, explain.id],
      [ran.lease_token, explain.lease_token],
    ]);
    const reads: QueueRead[] = [];
    for (const { sql, bindings } of about) {
      const values = bindings.map((value) => (swap.has(value) ? swap.get(value) : value));
      reads.push(...(await queueReads({ name: `explain_${++explained}`, text: sql }, values)));
    }
    return reads;
  }

  /**
   * The scans of queue tables in the statement's plan, run (EXPLAIN ANALYZE) and rolled back;
   * `generic`: the plan Postgres keeps for a prepared statement, made for any values.
   */
  async function queueReads(
    statement: { name: string; text: string },
    values: unknown[],
    { generic = false } = {},
  ): Promise<QueueRead[]> {
    const trx = await server.ctx.knex.transaction();
    try {
      if (generic) await trx.raw('SET LOCAL plan_cache_mode = force_generic_plan');
      const [row] = await runPrepared<{ 'QUERY PLAN': [{ Plan: PlanNode }] }>(
        trx,
        { name: statement.name, text: `EXPLAIN (ANALYZE, FORMAT JSON) ${statement.text}` },
        values,
      );
      return flatten(row!['QUERY PLAN'][0].Plan)
        .filter((node) => QUEUE_TABLES.includes(node['Relation Name'] ?? ''))
        .map((node) => ({
          scan: node['Index Name'] ? `${node['Node Type']} on ${node['Index Name']}` : node['Node Type'],
          statement: statement.text,
          // EXPLAIN counts rows per loop
          rows:
            ((node['Actual Rows'] ?? 0) + (node['Rows Removed by Filter'] ?? 0)) *
            (node['Actual Loops'] ?? 1),
        }));
    } finally {
      await trx.rollback();
    }
  }

  it('finds a leased job by its id while the statistics say no job runs', async () => {
    // no autovacuum ANALYZE may tell Postgres of the running jobs meanwhile
    await server.ctx.knex.raw('ALTER TABLE jobs SET (autovacuum_enabled = off)');
    // A queue of 3,000 jobs, 2,048 of them claimed: on a smaller one Postgres takes the primary key
    // anyway, and a fence written the old way would pass.
    await enqueueInOne(Array.from({ length: 30 * BURST_JOBS }, () => finetuneInput()));
    await jobsInStatistics();
    const worker = { workerId: 'w1', capabilities: { job_types: ['finetune'], device: 'cpu' as const } };
    const leased: Lease[] = [];
    for (let i = 0; i < 64; i++) leased.push(...(await claimJobs(server.ctx, worker, 32)));
    expect(leased).toHaveLength(64 * 32);
    const [a, b, c, d] = leased as [Lease, Lease, Lease, Lease];

    const reads = [
      ...(await queueReadsOf(a, b, () => heartbeatJob(server.ctx, a.id, a.lease_token!, { step: 1 }))),
      ...(await queueReadsOf(a, b, () =>
        reportLogs(server.ctx, a.id, a.lease_token!, [{ seq: 1, stream: 'stdout', text: 'step 1' }]),
      )),
      ...(await queueReadsOf(c, b, () =>
        failJob(server.ctx, c.id, c.lease_token!, { code: 'oom', message: 'out of memory', retryable: true }),
      )),
      // the completion is a prepared statement (runPrepared): its plan is made for any values
      ...(await queueReads(
        { ...COMPLETE_JOBS, name: 'explain_complete' },
        [
          JSON.stringify(
            [b, d].map((job) => ({
              job_id: job.id,
              lease_token: job.lease_token,
              result: { loss_final: 1 },
              adapter_name: 'stats-adapter',
              adapter_fallback: `stats-adapter-${job.id}`,
              adapter_model: 'tiny-base',
              adapter_training_config: {},
              adapter_metrics: {},
              model_kind: 'adapter',
              new_model_id: `model_${job.id}`,
              model_name: 'stats-model',
            })),
          ),
          0,
        ],
        { generic: true },
      )),
    ];
    expect(reads.length).toBeGreaterThan(0);
    // each statement read its jobs' rows and nothing more (a batch of two reads two)
    const wide = reads.filter((read) => read.rows > 2);
    expect(wide.map(({ scan, rows, statement }) => `${scan} read ${rows} rows in ${statement}`)).toEqual([]);
  });
});
