// No secret reaches the log at any level: real requests carrying API keys, worker tokens, lease
// tokens, teacher and hub keys go through a server logging at `trace`, and every byte it writes is
// searched for them. The logger itself is also fed secrets in fields, messages and errors.
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createLogger, maskSecretText, REDACTED } from '../src/logging.js';
import { fakeWorker } from './fake-worker.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

/** A log destination that keeps every line written to it. */
function capture() {
  const lines: string[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      lines.push(...chunk.toString('utf8').split('\n').filter(Boolean));
      done();
    },
  });
  return { stream, lines, text: () => lines.join('\n') };
}

const TEACHER_KEY = 'sk-teacher-5ecret-6f1d2a9c0b7e4d3f';
const HF_TOKEN = 'hf_gatedSecret0123456789abcdefABCDEF';

describe('logger', () => {
  it('masks Tunery secrets and bearer credentials anywhere in a line', () => {
    const key = `tk_${'A1b2C3d4'.repeat(4)}`;
    expect(maskSecretText(`{"msg":"bad key ${key}","h":"Bearer ${TEACHER_KEY}"}`)).toBe(
      `{"msg":"bad key tk_${REDACTED}","h":"Bearer ${REDACTED}"}`,
    );
    // Ids are not secrets: they stay readable.
    expect(maskSecretText('job_0123456789abcdef01234567')).toBe('job_0123456789abcdef01234567');
  });

  it('redacts secret-named fields, messages and errors at every level', () => {
    const log = capture();
    const logger = createLogger('trace', log.stream);
    const lease = `lease_${'x9Y8z7W6'.repeat(4)}`;
    const workerToken = `tw_${'Q-w_E1r2'.repeat(4)}`;
    const body = {
      config: { teacher_api_key: TEACHER_KEY, nested: [{ api_key: TEACHER_KEY }] },
      hf_token: HF_TOKEN,
      lease_token: lease,
      tokens_processed: 42,
    };
    for (const level of ['trace', 'debug', 'info', 'warn', 'error', 'fatal'] as const) {
      logger[level]({ body }, `${level}: worker ${workerToken} sent ${lease}`);
      logger[level]({ err: new Error(`upstream refused Bearer ${TEACHER_KEY} (lease ${lease})`) }, 'failed');
    }
    expect(log.lines).toHaveLength(12);
    for (const secret of [TEACHER_KEY, HF_TOKEN, lease, workerToken])
      expect(log.text()).not.toContain(secret);
    // What is not secret is still there.
    expect(JSON.parse(log.lines[0]!).body.tokens_processed).toBe(42);
    expect(log.text()).toContain('upstream refused Bearer [redacted]');
  });

  it("logs an error's cause with its own fields, secrets masked", () => {
    const log = capture();
    const logger = createLogger('error', log.stream);
    const lease = `lease_${'c4U5e6S7'.repeat(4)}`;
    const cause = Object.assign(new Error(`duplicate key for ${lease}`), {
      code: '23505',
      detail: 'Key (tenant_id, name)=(default, tuned) already exists.',
      // what a client library's or knex's error may carry
      config: { headers: { 'x-api-key': TEACHER_KEY } },
      api_key: TEACHER_KEY,
      bindings: [HF_TOKEN],
    });
    logger.error(
      { err: new Error('Job job_1 could not be handed to a worker', { cause }) },
      'request failed',
    );
    const { err } = JSON.parse(log.lines[0]!);
    expect(err.message).toBe('Job job_1 could not be handed to a worker');
    expect(err.cause).toMatchObject({
      type: 'Error',
      message: `duplicate key for lease_${REDACTED}`,
      code: '23505',
      detail: 'Key (tenant_id, name)=(default, tuned) already exists.',
    });
    for (const secret of [lease, TEACHER_KEY, HF_TOKEN]) expect(log.text()).not.toContain(secret);
    expect(err.cause.api_key).toBe(REDACTED);
  });
});

describe.each(DATABASES)('request logs on %s', (db) => {
  let server: TestServer;
  const log = capture();
  beforeAll(async () => {
    server = await startTestServer(db, { logLevel: 'trace' }, log.stream);
  });
  afterAll(async () => {
    await server?.stop();
  });

  it('carry no API key, worker token, lease token, teacher or hub key at any level', async () => {
    const worker = fakeWorker(server);
    // A user key in Authorization, answered 2xx, 4xx (bad body, unknown job) and 401 (wrong key).
    const created = await server.api('/v1/training/jobs', {
      method: 'POST',
      json: {
        base_model: 'smollm2-135m-instruct',
        train_texts: ['hello world'],
        max_steps: 2,
        hf_token: HF_TOKEN,
      },
    });
    expect(created.status).toBe(201);
    // Whatever the answer (an egress policy may refuse the teacher), the key must not be logged.
    await server.api('/v1/distillation', {
      method: 'POST',
      json: {
        name: 'secret-teacher',
        config: {
          teacher_model: 'openai/gpt-4o',
          teacher_api_key: TEACHER_KEY,
          student_model: 'smollm2-135m-instruct',
          prompts: ['hi'],
        },
      },
    });
    await server.api('/v1/training/jobs', { method: 'POST', json: { hf_token: HF_TOKEN } });
    await server.api('/v1/training/jobs/job_000000000000000000000000');
    const wrongKey = `tk_${'Zz9Yy8Xx'.repeat(4)}`;
    expect((await server.api('/v1/training/jobs', { key: wrongKey })).status).toBe(401);

    // A worker token; a lease token in a body and in the X-Lease-Token header, right and wrong.
    const job = await worker.claim();
    expect(job).not.toBeNull();
    expect((await worker.heartbeat(job!.job_id, job!.lease_token)).status).toBe(200);
    const upload = await worker.upload(job!.job_id, job!.lease_token, 'outputs', 'a.bin', Buffer.from('x'));
    expect(upload.status).toBe(201);
    const staleLease = `lease_${'Aa1Bb2Cc'.repeat(4)}`;
    expect((await worker.heartbeat(job!.job_id, staleLease)).status).toBe(409);
    await worker.upload(job!.job_id, staleLease, 'outputs', 'b.bin', Buffer.from('y'));

    const secrets = {
      'user key': server.key,
      'wrong user key': wrongKey,
      'worker token': server.workerToken,
      'lease token': job!.lease_token,
      'stale lease token': staleLease,
      'teacher key': TEACHER_KEY,
      'hub token': HF_TOKEN,
    };
    const text = log.text();
    // The log did record these requests (so the search below searched something).
    expect(text).toContain('/v1/workers/claim');
    expect(text).toContain('/v1/training/jobs/job_000000000000000000000000');
    for (const [what, secret] of Object.entries(secrets)) {
      expect(text.includes(secret), `the ${what} reached the log`).toBe(false);
    }
    expect(text).toContain(REDACTED);
  });
});
