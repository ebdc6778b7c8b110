/**
 * The peer of the worker-protocol benchmark: the least an HTTP job queue on Postgres can do, in its
 * own process. A bare node:http server over a `pg` pool (as large as Tunery's) and one table on a
 * scratch database, two prepared statements per job:
 *
 *   POST /v1/workers/claim               one UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED
 *                                        LIMIT 1) RETURNING the job and a fresh lease token
 *   POST /v1/workers/jobs/{id}/complete  one UPDATE fenced by that lease token, storing the result
 *
 * With `--records` it also writes what Tunery records of each job, in the same two statements: the
 * attempt's row (inserted at the claim, closed at the completion), a `claimed` and a `completed`
 * event, and the output's adapter and model rows (each table with Tunery's indexes on it). The rate
 * of the toy over this one's is what those records cost; this one's over Tunery's, what the rest of
 * Tunery costs per job: its server (validation, registry, the claim's answer…) and the reads its
 * statements make besides (a job's earlier adapter and model, its dataset's files).
 *
 * Same paths, bearer token and body shapes as Tunery's worker protocol, so one client loop drives
 * both; no validation, no logging, no ORM. Enqueues `--jobs N` jobs (one INSERT) before it prints
 * `READY {url, token, pending: [ids], pid}`, answers `GET /counts` (jobs by status) for the exactly-once
 * check, and serves until SIGTERM, SIGINT or the end of its stdin; its database is then dropped.
 */
import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { CREATE_JOB_BODY } from './job-body.js';
import { type ScratchDatabase, scratchDatabase } from './scratch-db.js';
import { stopWithParent } from './stop-with-parent.js';

export interface ToyInfo {
  url: string;
  token: string;
  pending: string[];
  /** This process, whose CPU the benchmark reads. */
  pid: number;
}

const SCHEMA = `
  CREATE TABLE toy_jobs (
    id text PRIMARY KEY,
    type text NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    spec jsonb NOT NULL,
    lease_token text,
    worker_id text,
    result jsonb,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    claimed_at timestamptz,
    completed_at timestamptz
  );
  CREATE INDEX toy_jobs_runnable ON toy_jobs (created_at) WHERE status = 'pending'`;

const CLAIM = {
  name: 'toy_claim',
  text: `UPDATE toy_jobs SET status = 'running', lease_token = $2, worker_id = $3, claimed_at = now()
          WHERE id = (SELECT id FROM toy_jobs WHERE status = 'pending' AND type = ANY($1::text[])
                       ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
          RETURNING id, type, spec, lease_token`,
};
const COMPLETE = {
  name: 'toy_complete',
  text: `UPDATE toy_jobs SET status = 'completed', result = $3, lease_token = NULL, completed_at = now()
          WHERE id = $1 AND lease_token = $2 AND status = 'running'
          RETURNING status`,
};

/** What `--records` adds: the attempts, events, adapters and models of Tunery's schema, pared down. */
const RECORDS_SCHEMA = `
  ALTER TABLE toy_jobs ADD COLUMN tenant_id text NOT NULL DEFAULT 'default',
    ADD COLUMN attempt int NOT NULL DEFAULT 0, ADD COLUMN event_seq int NOT NULL DEFAULT 0;
  CREATE TABLE toy_attempts (
    job_id text NOT NULL REFERENCES toy_jobs (id) ON DELETE CASCADE,
    attempt int NOT NULL,
    worker_id text NOT NULL,
    lease_token text NOT NULL,
    outcome text NOT NULL DEFAULT 'running',
    started_at timestamptz NOT NULL DEFAULT now(),
    ended_at timestamptz,
    PRIMARY KEY (job_id, attempt)
  );
  CREATE TABLE toy_events (
    job_id text NOT NULL REFERENCES toy_jobs (id) ON DELETE CASCADE,
    seq int NOT NULL,
    ts timestamptz NOT NULL,
    kind text NOT NULL,
    payload jsonb,
    PRIMARY KEY (job_id, seq)
  );
  CREATE TABLE toy_adapters (
    tenant_id text NOT NULL,
    name text NOT NULL,
    job_id text NOT NULL,
    metrics jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, name)
  );
  CREATE INDEX ON toy_adapters (job_id);
  CREATE TABLE toy_models (
    id text PRIMARY KEY,
    tenant_id text NOT NULL,
    job_id text NOT NULL,
    name text NOT NULL,
    kind text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
  );
  CREATE INDEX ON toy_models (tenant_id, created_at);
  CREATE INDEX ON toy_models (job_id)`;

const CLAIM_RECORDED = {
  name: 'toy_claim_recorded',
  text: `WITH claimed AS (
           UPDATE toy_jobs SET status = 'running', lease_token = $2, worker_id = $3, claimed_at = now(),
                  attempt = attempt + 1, event_seq = event_seq + 1
            WHERE id = (SELECT id FROM toy_jobs WHERE status = 'pending' AND type = ANY($1::text[])
                         ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
            RETURNING id, type, spec, lease_token, worker_id, attempt, event_seq
         ),
         attempt AS (
           INSERT INTO toy_attempts (job_id, attempt, worker_id, lease_token)
           SELECT id, attempt, worker_id, lease_token FROM claimed
         ),
         event AS (
           INSERT INTO toy_events (job_id, seq, ts, kind, payload)
           SELECT id, event_seq, now(), 'claimed', jsonb_build_object('attempt', attempt, 'worker_id', worker_id)
           FROM claimed
         )
         SELECT id, type, spec, lease_token FROM claimed`,
};
const COMPLETE_RECORDED = {
  name: 'toy_complete_recorded',
  text: `WITH done AS (
           UPDATE toy_jobs SET status = 'completed', result = $3, lease_token = NULL, completed_at = now(),
                  event_seq = event_seq + 1
            WHERE id = $1 AND lease_token = $2 AND status = 'running'
            RETURNING id, tenant_id, attempt, event_seq, status
         ),
         adapter AS (
           INSERT INTO toy_adapters (tenant_id, name, job_id, metrics) SELECT tenant_id, id, id, $3::jsonb FROM done
         ),
         model AS (
           INSERT INTO toy_models (id, tenant_id, job_id, name, kind)
           SELECT 'model_' || id, tenant_id, id, id, 'adapter' FROM done
         ),
         ended AS (
           UPDATE toy_attempts SET outcome = 'completed', ended_at = now() FROM done
           WHERE toy_attempts.job_id = done.id AND toy_attempts.attempt = done.attempt
         ),
         event AS (
           INSERT INTO toy_events (job_id, seq, ts, kind, payload)
           SELECT id, event_seq, now(), 'completed', jsonb_build_object('attempt', attempt) FROM done
         )
         SELECT status FROM done`,
};

const { values } = parseArgs({
  options: { jobs: { type: 'string', default: '0' }, records: { type: 'boolean', default: false } },
});
const STATEMENTS = values.records
  ? { claim: CLAIM_RECORDED, complete: COMPLETE_RECORDED }
  : { claim: CLAIM, complete: COMPLETE };
const jobCount = Number(values.jobs);
const token = randomUUID();

function send(res: ServerResponse, status: number, body?: unknown) {
  if (body === undefined) {
    res.writeHead(status).end();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

const error = (code: string, message: string) => ({ error: { code, message, param: null } });

async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}') as Record<string, unknown>;
}

async function claim(pool: pg.Pool, body: Record<string, unknown>, res: ServerResponse) {
  const capabilities = body.capabilities as { job_types?: string[] } | undefined;
  const { rows } = await pool.query({
    ...STATEMENTS.claim,
    values: [capabilities?.job_types ?? [], randomUUID(), body.worker_id],
  });
  const job = rows[0] as { id: string; type: string; spec: unknown; lease_token: string } | undefined;
  if (!job) return send(res, 204);
  send(res, 200, { job: { job_id: job.id, type: job.type, spec: job.spec, lease_token: job.lease_token } });
}

async function complete(pool: pg.Pool, jobId: string, body: Record<string, unknown>, res: ServerResponse) {
  const { rows } = await pool.query({
    ...STATEMENTS.complete,
    values: [jobId, body.lease_token, JSON.stringify(body.result ?? null)],
  });
  if (rows.length === 0) return send(res, 409, error('lease_mismatch', 'not running under this lease'));
  send(res, 200, { id: jobId, status: 'completed' });
}

async function counts(pool: pg.Pool, res: ServerResponse) {
  const { rows } = await pool.query('SELECT status, count(*)::int AS n FROM toy_jobs GROUP BY status');
  send(res, 200, Object.fromEntries(rows.map((row: { status: string; n: number }) => [row.status, row.n])));
}

const COMPLETE_PATH = /^\/v1\/workers\/jobs\/([^/]+)\/complete$/;

async function route(pool: pg.Pool, req: IncomingMessage, res: ServerResponse) {
  if (req.headers.authorization !== `Bearer ${token}`) {
    return send(res, 401, error('unauthorized', 'bad token'));
  }
  if (req.method === 'GET' && req.url === '/counts') return counts(pool, res);
  if (req.method !== 'POST') return send(res, 404, error('not_found', 'no such route'));
  if (req.url === '/v1/workers/claim') return claim(pool, await readJson(req), res);
  const completing = COMPLETE_PATH.exec(req.url ?? '');
  if (completing) return complete(pool, decodeURIComponent(completing[1]!), await readJson(req), res);
  send(res, 404, error('not_found', 'no such route'));
}

async function enqueue(pool: pg.Pool, n: number): Promise<string[]> {
  await pool.query(SCHEMA);
  if (values.records) await pool.query(RECORDS_SCHEMA);
  const { rows } = await pool.query(
    `INSERT INTO toy_jobs (id, type, spec)
     SELECT 'toyjob_' || lpad(i::text, 6, '0'), 'finetune', $1::jsonb FROM generate_series(1, $2::int) AS i
     RETURNING id`,
    [JSON.stringify(CREATE_JOB_BODY), n],
  );
  // Statistics for the batch, as Tunery takes of its jobs after a burst (queue/statistics.ts):
  // without them the planner can guess a handful of pending rows and have each claim read and sort
  // all of them. The jobs table only: the others are empty now, and a plan cached on "empty" would
  // read each table whole for every job.
  await pool.query('ANALYZE toy_jobs');
  return rows.map((row: { id: string }) => row.id);
}

let scratch: ScratchDatabase | undefined;
let pool: pg.Pool | undefined;
let stopping: Promise<void> | undefined;
const server = createServer((req, res) => {
  route(pool!, req, res).catch((err: unknown) => {
    if (!res.headersSent) send(res, 500, error('internal', err instanceof Error ? err.message : String(err)));
  });
});
/** Stops serving, closes the pool, drops the scratch database, exits. */
const shutdown = (code: number) => {
  stopping ??= (async () => {
    server.closeAllConnections();
    server.close();
    await pool?.end().catch(() => {});
    await scratch?.drop().catch(() => {});
    process.exit(code);
  })();
  return stopping;
};
stopWithParent(() => shutdown(0));

try {
  scratch = await scratchDatabase('tunery_bench_toy');
  // Tunery's knex pool holds at most 10 connections (src/db.ts): the toy gets the same.
  pool = new pg.Pool({ connectionString: scratch.url, max: 10 });
  // At shutdown the scratch database is dropped WITH (FORCE) while the pool's clients may still be
  // closing: the backend's "terminating connection" then reaches an idle client as an error event,
  // which is expected then. While serving, such an error is as fatal as it would be unheard.
  pool.on('error', (err) => {
    if (!stopping) throw err;
  });
  const pending = await enqueue(pool, jobCount);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  const info: ToyInfo = { url: `http://127.0.0.1:${port}`, token, pending, pid: process.pid };
  process.stdout.write(`READY ${JSON.stringify(info)}\n`);
} catch (err) {
  process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  await shutdown(1);
}
