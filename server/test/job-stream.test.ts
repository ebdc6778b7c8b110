import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createFinetune, fakeWorker } from './fake-worker.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

interface Message {
  id: string;
  event: string;
  data: Record<string, unknown>;
}

/** Every message of an event stream, read until the server closes it; `onFirst` runs once the first is in. */
async function readStream(res: Response, onFirst: () => void = () => {}): Promise<Message[]> {
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toMatch(/^text\/event-stream/);
  let text = '';
  const decoder = new TextDecoder();
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    const before = text.includes('\n\n');
    text += decoder.decode(chunk, { stream: true });
    if (!before && text.includes('\n\n')) onFirst();
  }
  return text
    .split('\n\n')
    .filter((block) => block.trim() && !block.startsWith(':'))
    .map((block) => {
      const field = (name: string) =>
        block
          .split('\n')
          .find((line) => line.startsWith(`${name}: `))
          ?.slice(name.length + 2) ?? '';
      return { id: field('id'), event: field('event'), data: JSON.parse(field('data')) };
    });
}

describe.each(DATABASES)('job streams on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(async () => {
    await server?.stop();
  });

  /** Runs a job through a fake worker: two log lines, train and eval points, a phase, completion. */
  async function runJob(id: string) {
    const worker = fakeWorker(server);
    const job = (await worker.claim())!;
    expect(job.job_id).toBe(id);
    const ts = new Date().toISOString();
    await worker.logs(id, job.lease_token, [
      { seq: 1, text: 'step 1', ts },
      { seq: 2, text: 'step 2', ts },
    ]);
    await worker.metrics(id, job.lease_token, [
      { step: 1, phase: 'train', loss: 2.5, ts },
      { step: 2, phase: 'train', loss: 2.1, ts },
      { step: 2, phase: 'eval', eval_loss: 2.2, ts },
    ]);
    await worker.events(id, job.lease_token, {
      events: [{ kind: 'phase', ts, payload: { phase: 'training' } }],
    });
    expect((await worker.complete(id, job.lease_token, { steps: 2 })).status).toBe(200);
  }

  it('follows a job from pending to its end: logs, metrics, events and status, then end', async () => {
    const id = await createFinetune(server);
    // The job runs once the stream has sent its first message: the rest is recorded while it is open.
    let opened: () => void = () => {};
    const first = new Promise<void>((resolve) => {
      opened = resolve;
    });
    const streamed = server.api(`/v1/training/jobs/${id}/stream`).then((res) => readStream(res, opened));
    await first;
    await runJob(id);
    const messages = await streamed;

    expect(messages[0]).toMatchObject({ event: 'status', data: { status: 'pending' } });
    expect(messages.at(-1)).toMatchObject({ event: 'end', data: { status: 'completed' } });
    const of = (event: string) => messages.filter((m) => m.event === event).map((m) => m.data);
    expect(of('log').map((l) => l.text)).toEqual(['step 1', 'step 2']);
    expect(of('metric').map((p) => `${p.phase}@${p.step}`)).toEqual(['train@1', 'train@2', 'eval@2']);
    const kinds = of('event').map((e) => e.kind);
    expect(kinds).toEqual(expect.arrayContaining(['created', 'claimed', 'phase', 'completed']));
    expect(of('status').at(-1)).toMatchObject({ status: 'completed' });
    // What the stream sent is what the job's pages hold.
    const events = await (await server.api(`/v1/training/jobs/${id}/events`)).json();
    expect(kinds).toEqual(events.events.map((e: { kind: string }) => e.kind));
  });

  it('resumes after Last-Event-ID with only what was not sent, and replays a finished job whole', async () => {
    const id = await createFinetune(server);
    await runJob(id);
    const all = await readStream(await server.api(`/v1/training/jobs/${id}/stream`));
    const firstLog = all.findIndex((m) => m.event === 'log');
    const rest = await readStream(
      await server.api(`/v1/training/jobs/${id}/stream`, {
        headers: { 'Last-Event-ID': all[firstLog]!.id },
      }),
    );
    const key = (m: Message) => `${m.event}:${JSON.stringify(m.data)}`;
    const expected = all.slice(firstLog + 1).filter((m) => m.event !== 'status');
    expect(rest.filter((m) => m.event !== 'status').map(key)).toEqual(expected.map(key));
    // The query parameter does the same for clients that cannot set headers.
    const viaQuery = await readStream(
      await server.api(
        `/v1/training/jobs/${id}/stream?last_event_id=${encodeURIComponent(all[firstLog]!.id)}`,
      ),
    );
    expect(viaQuery.map(key)).toEqual(rest.map(key));
  });

  it('carries only the sources `include` names, from a position a client wrote itself', async () => {
    const id = await createFinetune(server);
    await runJob(id);
    const all = await readStream(await server.api(`/v1/training/jobs/${id}/stream`));
    const logs = all.filter((m) => m.event === 'log');
    const after = logs[0]!.data.seq;
    const only = await readStream(
      await server.api(`/v1/training/jobs/${id}/stream?include=log`, {
        headers: { 'Last-Event-ID': `l${after}.e0.m` },
      }),
    );
    expect(only.map((m) => m.event)).toEqual(['status', ...logs.slice(1).map(() => 'log'), 'end']);
    expect(only.filter((m) => m.event === 'log').map((m) => m.data)).toEqual(
      logs.slice(1).map((m) => m.data),
    );
    // two sources, the comma as is (a curl or EventSource URL) and encoded (what URL builders send)
    for (const include of ['log,event', 'log%2Cevent']) {
      const two = await readStream(await server.api(`/v1/training/jobs/${id}/stream?include=${include}`));
      expect(new Set(two.map((m) => m.event))).toEqual(new Set(['status', 'log', 'event', 'end']));
    }
    const bad = await server.api(`/v1/training/jobs/${id}/stream?include=log,status`);
    expect(bad.status).toBe(400);
    expect((await bad.json()).error).toMatchObject({ code: 'invalid_request', param: 'include' });
  });

  it('ends after max_seconds without end while the job goes on', async () => {
    const id = await createFinetune(server);
    const messages = await readStream(await server.api(`/v1/training/jobs/${id}/stream?max_seconds=0`));
    expect(messages[0]).toMatchObject({ event: 'status', data: { status: 'pending' } });
    expect(messages.map((m) => m.event)).not.toContain('end');
    expect(messages.filter((m) => m.event === 'event').map((m) => m.data.kind)).toEqual(['created']);
  });

  it('refuses an id it did not send, and another tenant’s job does not exist', async () => {
    const id = await createFinetune(server);
    const bad = await server.api(`/v1/training/jobs/${id}/stream`, { headers: { 'Last-Event-ID': 'x' } });
    expect(bad.status).toBe(400);
    expect((await bad.json()).error).toMatchObject({ code: 'invalid_request', param: 'Last-Event-ID' });
    const theirs = await server.api(`/v1/training/jobs/${id}/stream`, { key: server.otherKey });
    expect(theirs.status).toBe(404);
    expect((await theirs.json()).error.code).toBe('job_not_found');
    await server.api(`/v1/training/jobs/${id}/cancel`, { method: 'POST' });
  });
});
