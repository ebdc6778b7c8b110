// A job's live stream (`GET …/stream`, server-sent events) as an async iterator: each message once,
// reconnecting after the last one received until the server says the job has ended.
import type { components } from '../generated/api.js';
import { sleep } from './abort.js';

type Schemas = components['schemas'];

/** One message of a job's live stream, by its `type` (the SSE `event`). */
export type JobStreamMessage =
  | { type: 'log'; id: string; data: Schemas['LogLine'] }
  | { type: 'metric'; id: string; data: Schemas['MetricPoint'] }
  | { type: 'event'; id: string; data: Schemas['JobEvent'] }
  | { type: 'status'; id: string; data: Schemas['JobStreamStatus'] }
  | { type: 'end'; id: string; data: Schemas['JobStreamEnd'] };

/** A source of a job's stream; status changes and `end` always come. */
export type JobStreamSource = 'log' | 'metric' | 'event';

export interface JobStreamOptions {
  /**
   * Continue after this message `id` (from an earlier stream) instead of from the start. An id
   * reads `l<log seq>.e<event seq>.m<phase>:<step>,…`: `l120.e0.m` starts the logs after seq 120.
   */
  lastEventId?: string | undefined;
  /** Only these sources (default: all): `['log']` reads no metric or event rows on the server. */
  include?: readonly JobStreamSource[] | undefined;
  /** Stops the stream: the iterator rejects with APIUserAbortError. */
  signal?: AbortSignal | undefined;
}

/** Opens the stream after `lastEventId`. */
export type OpenJobStream = (
  lastEventId: string | undefined,
  signal: AbortSignal | undefined,
) => Promise<ReadableStream<Uint8Array>>;

/** The stream's query for `options` (its `include`, comma-separated). */
export function streamQuery(options: JobStreamOptions = {}): { include?: string } {
  return options.include?.length ? { include: options.include.join(',') } : {};
}

/** Pause before reconnecting to a stream that closed without sending anything. */
const IDLE_RECONNECT_MS = 1000;

export async function* followJobStream(
  open: OpenJobStream,
  options: JobStreamOptions = {},
): AsyncGenerator<JobStreamMessage, void, undefined> {
  let lastId = options.lastEventId;
  let lastStatus = '';
  for (;;) {
    const connectedAfter = lastId;
    for await (const message of parseServerSentEvents(await open(lastId, options.signal))) {
      lastId = message.id ?? lastId;
      const item = { type: message.event, id: message.id ?? '', data: JSON.parse(message.data) };
      // Every connection starts with the current status: yield it only when it changed.
      if (item.type === 'status') {
        if (message.data === lastStatus) continue;
        lastStatus = message.data;
      }
      yield item as JobStreamMessage;
      if (item.type === 'end') return;
    }
    // Closed without `end` (the server's max_seconds, a dropped connection): go on after lastId,
    // pausing first when that connection brought nothing new.
    if (lastId === connectedAfter) await sleep(IDLE_RECONNECT_MS, options.signal);
  }
}

interface ServerSentEvent {
  id: string | undefined;
  event: string;
  data: string;
}

/** The messages of an event stream (comments, such as heartbeats, skipped). */
export async function* parseServerSentEvents(
  stream: ReadableStream<Uint8Array>,
): AsyncGenerator<ServerSentEvent, void, undefined> {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n?/g, '\n');
      for (let end = buffer.indexOf('\n\n'); end >= 0; end = buffer.indexOf('\n\n')) {
        const message = parseBlock(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (message) yield message;
      }
    }
  } finally {
    // Not awaited: a body whose source has already ended may never settle its cancel.
    reader.cancel().catch(() => {});
  }
}

function parseBlock(block: string): ServerSentEvent | undefined {
  let id: string | undefined;
  let event = 'message';
  const data: string[] = [];
  for (const line of block.split('\n')) {
    if (line === '' || line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
    if (field === 'id') id = value;
    else if (field === 'event') event = value;
    else if (field === 'data') data.push(value);
  }
  return data.length > 0 ? { id, event, data: data.join('\n') } : undefined;
}
