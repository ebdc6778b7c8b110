// A job's live stream as the server sends it: status, then what was recorded after `Last-Event-ID`,
// then `end` once the job has finished. The mock sends what it has and closes (as the server does
// after `max_seconds`); the SDK reconnects, and with `autoAdvance` each connection moves the job on.
import { MockHttpError } from './errors.js';
import type { MockState } from './state.js';

interface Position {
  log: number;
  event: number;
  metric: Record<string, number>;
}

const TERMINAL = new Set(['completed', 'failed', 'cancelled']);

export function jobStreamResponse(
  state: MockState,
  jobId: string,
  job: { status: string; phase?: string | null | undefined },
  request: Request,
): Response {
  const query = new URL(request.url).searchParams;
  const position = parsePosition(request.headers.get('last-event-id') ?? query.get('last_event_id'));
  // `include=log,event`: only those sources (status and `end` always go out).
  const include = new Set((query.get('include') ?? 'log,metric,event').split(','));
  let text = '';
  const send = (event: string, data: unknown) => {
    text += `id: ${formatPosition(position)}\nevent: ${event}\ndata: ${JSON.stringify(data)}\n\n`;
  };
  send('status', { status: job.status, phase: job.phase ?? null });
  const recorded = <T>(source: string, items: T[] | undefined) => (include.has(source) ? (items ?? []) : []);
  for (const line of recorded('log', state.logs.get(jobId)).filter((l) => l.seq > position.log)) {
    position.log = line.seq;
    send('log', line);
  }
  const metrics = recorded('metric', state.metrics.get(jobId)).filter(
    (p) => p.step > (position.metric[p.phase] ?? -1),
  );
  for (const point of metrics) {
    position.metric[point.phase] = point.step;
    send('metric', point);
  }
  for (const event of recorded('event', state.events.get(jobId)).filter((e) => e.seq > position.event)) {
    position.event = event.seq;
    send('event', event);
  }
  if (TERMINAL.has(job.status)) send('end', { status: job.status });
  return new Response(text, { headers: { 'content-type': 'text/event-stream; charset=utf-8' } });
}

const formatPosition = (p: Position) =>
  `l${p.log}.e${p.event}.m${Object.entries(p.metric)
    .map(([phase, step]) => `${phase}:${step}`)
    .join(',')}`;

function parsePosition(id: string | null): Position {
  if (!id) return { log: 0, event: 0, metric: {} };
  const match = /^l(\d{1,9})\.e(\d{1,9})\.m((?:[a-z_]{1,32}:-?\d{1,9},?)*)$/.exec(id);
  if (!match) {
    throw new MockHttpError(
      400,
      'invalid_request',
      'Last-Event-ID is not an id this stream sent.',
      'Last-Event-ID',
    );
  }
  const metric: Record<string, number> = {};
  for (const pair of (match[3] ?? '').split(',').filter(Boolean)) {
    const [phase, step] = pair.split(':');
    metric[phase as string] = Number(step);
  }
  return { log: Number(match[1]), event: Number(match[2]), metric };
}
