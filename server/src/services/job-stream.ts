/**
 * A job's live stream: one server-sent-events connection that carries its log lines, metric points,
 * timeline events and status changes as they are recorded, and ends once the job has finished and
 * everything it recorded has been sent.
 *
 * Every message's `id` is the stream's position (what was sent of each source), so a client that
 * reconnects with `Last-Event-ID` gets only what it has not seen. The stream reads the database, not
 * a process-local signal, so it follows a job wherever its worker reports (any server process).
 */
import type { Request, Response } from 'express';
import type { AppContext } from '../context.js';
import { badRequest } from '../errors.js';
import { isoRequired, queryInt } from '../http.js';
import type { JobRow } from '../queue/types.js';

const POLL_MS = 500;
const HEARTBEAT_MS = 15_000;
const BATCH = 500;
const TERMINAL = new Set(['completed', 'failed', 'cancelled']);

/** The sources a stream can carry (`include`); status changes and `end` always go out. */
type Source = 'log' | 'metric' | 'event';

/** `include=log,event` (already checked against the spec's pattern); absent: every source. */
function includedSources(include: unknown): Set<Source> {
  if (typeof include !== 'string') return new Set(['log', 'metric', 'event']);
  return new Set(include.split(',') as Source[]);
}

/** What a stream has sent: the last log and event seq, and the last metric step of each phase. */
interface Position {
  log: number;
  event: number;
  metric: Record<string, number>;
}

/** `l<seq>.e<seq>.m<phase>:<step>,…`, as the spec documents it (a client may start logs after a seq). */
export function formatPosition(p: Position): string {
  const metric = Object.entries(p.metric)
    .map(([phase, step]) => `${phase}:${step}`)
    .join(',');
  return `l${p.log}.e${p.event}.m${metric}`;
}

export function parsePosition(id: string | undefined): Position {
  if (id === undefined || id === '') return { log: 0, event: 0, metric: {} };
  const match = /^l(\d{1,9})\.e(\d{1,9})\.m((?:[a-z_]{1,32}:-?\d{1,9},?)*)$/.exec(id);
  if (!match) throw badRequest('Last-Event-ID is not an id this stream sent.', 'Last-Event-ID');
  const metric: Record<string, number> = {};
  for (const pair of (match[3] ?? '').split(',').filter(Boolean)) {
    const [phase, step] = pair.split(':');
    metric[phase as string] = Number(step);
  }
  return { log: Number(match[1]), event: Number(match[2]), metric };
}

/** Streams `job` (already checked to be the caller's) until it ends, the client leaves or the server stops. */
export async function streamJob(ctx: AppContext, req: Request, res: Response, job: JobRow): Promise<void> {
  const lastId = req.get('last-event-id') ?? (req.query.last_event_id as string | undefined);
  const position = parsePosition(lastId);
  const sources = includedSources(req.query.include);
  const deadline = Date.now() + queryInt(req, 'max_seconds', 300) * 1000;
  res.writeHead(200, {
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-cache',
    'x-accel-buffering': 'no',
  });
  let open = true;
  const stop = () => {
    open = false;
  };
  res.once('close', stop);
  ctx.shuttingDown.signal.addEventListener('abort', stop, { once: true });
  const send = (event: string, data: unknown) => {
    res.write(`id: ${formatPosition(position)}\nevent: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
  };
  let lastStatus = '';
  let lastBeat = Date.now();
  try {
    while (open) {
      const row = (await ctx.knex('jobs').where('id', job.id).first('status', 'phase')) as Pick<
        JobRow,
        'status' | 'phase'
      >;
      const status = `${row.status}/${row.phase ?? ''}`;
      if (status !== lastStatus) {
        lastStatus = status;
        send('status', { status: row.status, phase: row.phase ?? null });
      }
      // Status is read before the telemetry, so that a job seen finished has nothing left unsent.
      const sent = await sendNewTelemetry(ctx, job.id, position, sources, send);
      if (TERMINAL.has(row.status) && sent === 0) {
        send('end', { status: row.status });
        break;
      }
      if (sent > 0) continue;
      if (Date.now() >= deadline) break;
      if (Date.now() - lastBeat >= HEARTBEAT_MS) {
        res.write(': heartbeat\n\n');
        lastBeat = Date.now();
      }
      await pause(ctx);
    }
  } finally {
    res.off('close', stop);
    ctx.shuttingDown.signal.removeEventListener('abort', stop);
    res.end();
  }
}

/**
 * Sends what `sources` recorded after `position` (advancing it), oldest first; returns how much it
 * sent. A source left out is not read at all.
 */
async function sendNewTelemetry(
  ctx: AppContext,
  jobId: string,
  position: Position,
  sources: Set<Source>,
  send: (event: string, data: unknown) => void,
): Promise<number> {
  const none = Promise.resolve([]);
  const [logs, events, metrics] = await Promise.all([
    !sources.has('log')
      ? none
      : ctx
          .knex('job_logs')
          .where('job_id', jobId)
          .andWhere('seq', '>', position.log)
          .orderBy('seq')
          .limit(BATCH),
    !sources.has('event')
      ? none
      : ctx
          .knex('job_events')
          .where('job_id', jobId)
          .andWhere('seq', '>', position.event)
          .orderBy('seq')
          .limit(BATCH),
    !sources.has('metric')
      ? none
      : ctx
          .knex('job_metrics')
          .where('job_id', jobId)
          .andWhere((q) => {
            // Per phase, the steps after the last one sent (a phase not seen yet: all of them).
            for (const [phase, step] of Object.entries(position.metric)) {
              q.orWhere((p) => p.where('phase', phase).andWhere('step', '>', step));
            }
            q.orWhereNotIn('phase', Object.keys(position.metric));
          })
          .orderBy([{ column: 'step' }, { column: 'phase', order: 'desc' }])
          .limit(BATCH),
  ]);
  for (const r of logs) {
    position.log = r.seq;
    send('log', { seq: r.seq, ts: isoRequired(r.ts), stream: r.stream, text: r.text });
  }
  for (const r of metrics) {
    position.metric[r.phase] = Math.max(position.metric[r.phase] ?? -1, r.step);
    send('metric', { ...r.point, ts: isoRequired(r.ts), step: r.step, phase: r.phase });
  }
  for (const r of events) {
    position.event = r.seq;
    send('event', { seq: r.seq, ts: isoRequired(r.ts), kind: r.kind, payload: r.payload });
  }
  return logs.length + metrics.length + events.length;
}

function pause(ctx: AppContext): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, POLL_MS);
    function done() {
      clearTimeout(timer);
      ctx.shuttingDown.signal.removeEventListener('abort', done);
      resolve();
    }
    ctx.shuttingDown.signal.addEventListener('abort', done, { once: true });
  });
}
