/**
 * Gang scheduling: a job with `num_nodes` N > 1 runs on N workers at once, all or none.
 *
 * A gang job stays `pending` while its gang forms. The claim query offers it like any job (to workers
 * that said where they would host a rendezvous); such a claim joins the gang instead of leasing the
 * job: it adds a member row for the next attempt, with a join window (`gangWindowSeconds`). The join
 * that brings the gang to N starts the attempt in the same transaction: ranks in order of arrival,
 * the job `running` under rank 0's member token (rank 0 is the job's ordinary lease holder: it
 * heartbeats, reports, uploads and completes), the others heartbeating their own membership. A member
 * whose window passes before the gang is whole gives its slot up (`expired`) and claims again, so two
 * gangs competing for the same workers cannot hold each other forever. Once started, the attempt is
 * the gang's: a member whose lease lapses ends it for all (the sweeper expires the job's lease, and
 * the job goes back to the queue as any lost attempt), and every member's fence is the job's current
 * attempt, so whatever ends the attempt (complete, fail, release, rescue) ends every membership.
 */
import type { Knex } from 'knex';
import type { AppContext } from '../context.js';
import { leaseLost } from '../errors.js';
import { newSecret } from '../ids.js';
import type { CallerGone } from './coalesce.js';
import { recordEvent } from './events.js';
import { fenceMissError, runningSql, START_ATTEMPT } from './lease.js';
import { notifyGangAfterCommit, waitForGangStart } from './notify.js';
import type { JobRow } from './types.js';

/** Where a worker would host the group's rendezvous (torchrun's master) if it became rank 0. */
export interface GangAddress {
  addr: string;
  port: number;
}

/** A claim's answer for a gang job: the worker joined its gang and now waits for the rest. */
export interface GangJoin {
  job_id: string;
  member_token: string;
  world: number;
  joined: number;
  window_expires_at: Date;
}

interface MemberRow {
  job_id: string;
  attempt: number;
  worker_id: string;
  member_token: string;
  addr: string;
  port: number;
  rank: number | null;
  joined_at: Date;
  expires_at: Date;
}

/** What a started member learns: its place in the group and where rank 0 hosts the rendezvous. */
export interface GangPlace {
  rank: number;
  world: number;
  master_addr: string;
  master_port: number;
}

export type GangWaitOutcome =
  | { state: 'forming'; joined: number; world: number }
  | { state: 'expired'; joined: number; world: number }
  | { state: 'started'; place: GangPlace; job: JobRow };

const RECHECK_MS = 1000;

/** How long a join waits for its gang job's row (another join holds it for milliseconds). */
const JOIN_LOCK_TIMEOUT = '5s';

/**
 * Joins the gang of `jobId` (a pending gang job the claim query offered), or returns null when the
 * job is no longer joinable (it started, was cancelled, or this worker is in it already).
 */
export async function joinGang(
  ctx: AppContext,
  jobId: string,
  workerId: string,
  address: GangAddress,
): Promise<GangJoin | null> {
  return ctx.knex.transaction(async (trx) => {
    // Blocking lock: joins of one gang queue up here, so the one that completes it sees every member.
    // A join takes milliseconds; a row held longer (a stuck transaction) fails this claim (500)
    // rather than holding it, and a pool connection, without end.
    await trx.raw(`SET LOCAL lock_timeout = '${JOIN_LOCK_TIMEOUT}'`);
    const locked = await trx.raw(
      `SELECT * FROM jobs WHERE id = :jobId AND status = 'pending' AND num_nodes > 1 AND run_at <= now() FOR UPDATE`,
      { jobId },
    );
    const job = locked.rows[0] as JobRow | undefined;
    if (!job) return null;
    const attempt = job.attempt + 1;
    // Members whose window passed without a word (their worker died while waiting) hold no slot.
    // Windows are read and set at the statement's time, not the transaction's (now()): the wait for
    // the lock must not shorten the joiner's window, nor hold other members' open.
    await trx.raw(
      `DELETE FROM job_gang_members
       WHERE job_id = :jobId AND attempt = :attempt AND rank IS NULL AND expires_at < statement_timestamp()`,
      { jobId, attempt },
    );
    const memberToken = newSecret('lease');
    const inserted = await trx.raw(
      `
      INSERT INTO job_gang_members (job_id, attempt, worker_id, member_token, addr, port, expires_at)
      VALUES (:jobId, :attempt, :workerId, :memberToken, :addr, :port,
              statement_timestamp() + make_interval(secs => :windowSeconds))
      ON CONFLICT (job_id, attempt, worker_id) DO NOTHING
      RETURNING expires_at`,
      {
        jobId,
        attempt,
        workerId,
        memberToken,
        addr: address.addr,
        port: address.port,
        windowSeconds: ctx.config.gangWindowSeconds,
      },
    );
    const mine = inserted.rows[0] as { expires_at: Date } | undefined;
    if (!mine) return null;
    const members = (
      await trx.raw(
        `SELECT * FROM job_gang_members WHERE job_id = :jobId AND attempt = :attempt
         ORDER BY joined_at, worker_id`,
        { jobId, attempt },
      )
    ).rows as MemberRow[];
    if (members.length >= job.num_nodes) await startGang(ctx, trx, job, members.slice(0, job.num_nodes));
    return {
      job_id: jobId,
      member_token: memberToken,
      world: job.num_nodes,
      joined: Math.min(members.length, job.num_nodes),
      window_expires_at: mine.expires_at,
    };
  });
}

/** The gang is whole: rank the members, lease the job to rank 0 and open the attempt, in one transaction. */
async function startGang(
  ctx: AppContext,
  trx: Knex.Transaction,
  job: JobRow,
  members: MemberRow[],
): Promise<void> {
  const rank0 = members[0]!;
  const started = await trx.raw(
    `
    UPDATE jobs SET
      ${START_ATTEMPT},
      updated_at = now()
    WHERE id = :jobId
    RETURNING attempt, resume_checkpoint`,
    {
      jobId: job.id,
      leaseToken: rank0.member_token,
      workerId: rank0.worker_id,
      leaseSeconds: ctx.config.leaseSeconds,
    },
  );
  const { attempt, resume_checkpoint } = started.rows[0] as Pick<JobRow, 'attempt' | 'resume_checkpoint'>;
  const ranks = members.map((m, rank) => ({ worker_id: m.worker_id, rank }));
  await trx.raw(
    `
    UPDATE job_gang_members m SET rank = r.rank, expires_at = statement_timestamp() + make_interval(secs => :leaseSeconds)
    FROM jsonb_to_recordset(:ranks::jsonb) AS r(worker_id text, rank int)
    WHERE m.job_id = :jobId AND m.attempt = :attempt AND m.worker_id = r.worker_id`,
    { jobId: job.id, attempt, ranks: JSON.stringify(ranks), leaseSeconds: ctx.config.leaseSeconds },
  );
  // Joined after the gang was whole (cannot happen under the row lock, but never leave a stray slot).
  await trx.raw(
    `DELETE FROM job_gang_members WHERE job_id = :jobId AND attempt = :attempt AND rank IS NULL`,
    { jobId: job.id, attempt },
  );
  await trx.raw(
    `INSERT INTO job_attempts (job_id, attempt, worker_id, lease_token) VALUES (:jobId, :attempt, :workerId, :token)`,
    { jobId: job.id, attempt, workerId: rank0.worker_id, token: rank0.member_token },
  );
  await recordEvent(trx, job.id, 'claimed', { attempt, worker_id: rank0.worker_id, resume_checkpoint });
  await recordEvent(trx, job.id, 'gang_started', {
    attempt,
    world: members.length,
    master_addr: rank0.addr,
    master_port: rank0.port,
    members: ranks,
  });
  // wakes the members waiting in waitForGang (it makes no job runnable: claims sleep on)
  notifyGangAfterCommit(ctx, trx);
}

interface MemberState extends MemberRow {
  job_status: JobRow['status'];
  job_attempt: number;
  num_nodes: number;
  window_over: boolean;
}

async function memberState(ctx: AppContext, jobId: string, memberToken: string): Promise<MemberState> {
  const result = await ctx.knex.raw(
    `
    SELECT m.*, j.status AS job_status, j.attempt AS job_attempt, j.num_nodes,
           m.expires_at < now() AS window_over
    FROM job_gang_members m JOIN jobs j ON j.id = m.job_id
    WHERE m.job_id = :jobId AND m.member_token = :memberToken`,
    { jobId, memberToken },
  );
  const row = result.rows[0] as MemberState | undefined;
  if (!row) throw await fenceMissError(ctx.knex, jobId);
  return row;
}

/**
 * Long-poll of a member: `started` (with its rank and the job) once the gang is whole, `expired`
 * when its window passed first (the slot is given up: claim again), `forming` when `waitSeconds`
 * passed (ask again). `409 lease_lost` when the membership is gone: the job was cancelled, or the
 * attempt the member belonged to ended.
 */
export async function waitForGang(
  ctx: AppContext,
  jobId: string,
  memberToken: string,
  waitSeconds: number,
  callerGone: CallerGone,
): Promise<GangWaitOutcome> {
  const deadline = Date.now() + waitSeconds * 1000;
  for (;;) {
    const m = await memberState(ctx, jobId, memberToken);
    if (m.rank !== null) {
      if (m.job_status !== 'running' || m.job_attempt !== m.attempt) throw leaseLost(jobId);
      const job = (await ctx.knex('jobs').where({ id: jobId }).first()) as JobRow;
      const rank0 = (await ctx
        .knex('job_gang_members')
        .where({ job_id: jobId, attempt: m.attempt, rank: 0 })
        .first()) as MemberRow;
      return {
        state: 'started',
        place: { rank: m.rank, world: m.num_nodes, master_addr: rank0.addr, master_port: rank0.port },
        job,
      };
    }
    const joined = await countForming(ctx, jobId, m.attempt);
    if (m.job_status !== 'pending' || m.window_over || callerGone.aborted) {
      await ctx.knex('job_gang_members').where({ member_token: memberToken }).whereNull('rank').delete();
      if (m.job_status !== 'pending') throw leaseLost(jobId);
      return { state: 'expired', joined: joined - 1, world: m.num_nodes };
    }
    const left = deadline - Date.now();
    if (left <= 0 || ctx.shuttingDown.signal.aborted) return { state: 'forming', joined, world: m.num_nodes };
    await waitForGangStart(ctx, Math.min(left, RECHECK_MS));
  }
}

async function countForming(ctx: AppContext, jobId: string, attempt: number): Promise<number> {
  const row = (await ctx
    .knex('job_gang_members')
    .where({ job_id: jobId, attempt })
    .whereNull('rank')
    .count<{ count: string }[]>('* as count')
    .first())!;
  return Number(row.count);
}

/** A member's heartbeat (ranks above 0): extends its lease while its attempt is the job's current one. */
export async function heartbeatGangMember(
  ctx: AppContext,
  jobId: string,
  memberToken: string,
): Promise<{ lease_expires_at: Date; cancel_requested: boolean }> {
  const result = await ctx.knex.raw(
    `
    WITH beat AS (
      UPDATE job_gang_members m SET expires_at = now() + make_interval(secs => :leaseSeconds)
      FROM jobs j
      -- fencing: only a member of the job's current, running attempt
      WHERE m.job_id = :jobId AND m.member_token = :memberToken AND m.rank IS NOT NULL
        AND j.id = m.job_id AND ${runningSql('j')} AND j.attempt = m.attempt
      RETURNING m.expires_at, j.cancel_requested, m.worker_id
    ),
    seen AS (UPDATE workers SET last_seen_at = now() FROM beat WHERE workers.id = beat.worker_id)
    SELECT expires_at AS lease_expires_at, cancel_requested FROM beat`,
    { jobId, memberToken, leaseSeconds: ctx.config.leaseSeconds },
  );
  const row = result.rows[0] as { lease_expires_at: Date; cancel_requested: boolean } | undefined;
  if (!row) throw await fenceMissError(ctx.knex, jobId);
  return row;
}

/** The running job a member token (rank > 0) belongs to, for its downloads; null when none. */
export async function jobOfMemberToken(ctx: AppContext, memberToken: string): Promise<JobRow | null> {
  const result = await ctx.knex.raw(
    `
    SELECT j.* FROM job_gang_members m JOIN jobs j ON j.id = m.job_id AND j.attempt = m.attempt
    WHERE m.member_token = :memberToken AND m.rank IS NOT NULL AND ${runningSql('j')}`,
    { memberToken },
  );
  return (result.rows[0] as JobRow | undefined) ?? null;
}

/**
 * Part of the sweeper's pass, in its transaction: running gangs with a member (rank > 0) whose lease
 * lapsed get their job's lease expired too, so the rescue that follows ends the attempt for all.
 */
export async function expireLostGangs(trx: Knex.Transaction, batchSize: number): Promise<void> {
  const result = await trx.raw(
    `
    WITH lost AS (
      SELECT j.id, m.attempt, m.rank, m.worker_id
      FROM job_gang_members m JOIN jobs j ON j.id = m.job_id AND j.attempt = m.attempt
      WHERE m.rank > 0 AND m.expires_at < now() AND j.status = 'running' AND j.lease_expires_at >= now()
      ORDER BY m.expires_at
      FOR UPDATE OF j SKIP LOCKED
      LIMIT :batchSize
    ),
    expired AS (
      UPDATE jobs SET lease_expires_at = now() - interval '1 millisecond'
      FROM lost WHERE jobs.id = lost.id
    )
    SELECT * FROM lost`,
    { batchSize },
  );
  for (const lost of result.rows as { id: string; attempt: number; rank: number; worker_id: string }[]) {
    await recordEvent(trx, lost.id, 'gang_member_lost', {
      attempt: lost.attempt,
      rank: lost.rank,
      worker_id: lost.worker_id,
    });
  }
}
