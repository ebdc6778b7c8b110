import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rescueExpiredLeases } from '../src/queue/rescue.js';
import { checkSecretsKey, loadSecretsKey, SecretBox, sealPlaintextSecrets } from '../src/secrets.js';
import { createFinetune, fakeWorker } from './fake-worker.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

describe('the secret box', () => {
  it('opens an envelope only for its own job and with its own key', () => {
    const key = randomBytes(32);
    const box = new SecretBox(key);
    const sealed = box.seal('job_a', { hf_token: 'hf_abc' })!;
    expect(JSON.stringify(sealed)).not.toContain('hf_abc');
    expect(box.open('job_a', sealed)).toEqual({ hf_token: 'hf_abc' });
    expect(() => box.open('job_b', sealed)).toThrow(/cannot be decrypted/);
    expect(() => new SecretBox(randomBytes(32)).open('job_a', sealed)).toThrow(/cannot be decrypted/);
    expect(box.seal('job_a', {})).toBeNull();
  });

  it('keeps one generated key in the data dir (0600), or takes TUNERY_SECRETS_KEY', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tunery-key-'));
    try {
      const first = await loadSecretsKey({ dataDir: dir, secretsKey: undefined });
      expect(first).toHaveLength(32);
      expect((await stat(join(dir, 'secrets-key'))).mode & 0o777).toBe(0o600);
      expect(await loadSecretsKey({ dataDir: dir, secretsKey: undefined })).toEqual(first);
      const given = randomBytes(32);
      expect(await loadSecretsKey({ dataDir: dir, secretsKey: given.toString('base64') })).toEqual(given);
      await expect(loadSecretsKey({ dataDir: dir, secretsKey: 'c2hvcnQ=' })).rejects.toThrow(/32 bytes/);
      expect((await readFile(join(dir, 'secrets-key'), 'utf8')).trim()).toBe(first.toString('base64'));
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe.each(DATABASES)('job secrets on %s', (db) => {
  let server: TestServer;
  let worker: ReturnType<typeof fakeWorker>;
  beforeAll(async () => {
    // No background sweeper: the test rescues the expired lease itself, so no concurrent pass can
    // hold the row (SKIP LOCKED) while the test reads it.
    server = await startTestServer(db, { sweepIntervalMs: 3_600_000 });
    worker = fakeWorker(server);
  });
  afterAll(async () => {
    await server?.stop();
  });

  const clearQueue = () =>
    server.ctx.knex('jobs').whereIn('status', ['pending', 'running']).update({ status: 'cancelled' });
  /** The stored row as text, as anyone reading the database (or a dump of it) would see it. */
  const rawRow = async (id: string) =>
    (await server.ctx.knex.raw('SELECT row_to_json(jobs)::text AS row FROM jobs WHERE id = ?', [id])).rows[0]
      .row as string;
  const storedSecrets = async (id: string) =>
    (await server.ctx.knex('jobs').where({ id }).first('secrets')).secrets as unknown;

  it('stores hf_token sealed, hands it to the leased worker, and erases it when the job completes', async () => {
    await clearQueue();
    const id = await createFinetune(server, { hf_token: 'hf_plaintext_token' });
    expect(await rawRow(id)).not.toContain('hf_plaintext_token');
    expect(await storedSecrets(id)).toMatchObject({ v: 1 });

    const claimed = (await worker.claim())!;
    expect(claimed.job_id).toBe(id);
    expect(claimed.spec.hf_token).toBe('hf_plaintext_token');

    expect((await worker.complete(id, claimed.lease_token)).status).toBe(200);
    expect(await storedSecrets(id)).toBeNull();
    expect(await rawRow(id)).not.toContain('hf_plaintext_token');
  });

  it('stores the teacher key sealed and hands it to the worker in the teacher spec', async () => {
    await clearQueue();
    const res = await server.api('/v1/distillation', {
      method: 'POST',
      json: {
        config: {
          teacher_model: 'openai/gpt-4o',
          teacher_api_key: 'sk-teacher-plaintext',
          student_model: 'smollm2-135m-instruct',
          prompts: ['one', 'two'],
        },
      },
    });
    expect(res.status).toBe(201);
    const { id } = (await res.json()) as { id: string };
    expect(await rawRow(id)).not.toContain('sk-teacher-plaintext');
    const claimed = (await worker.claim({ job_types: ['distill'], device: 'cpu' }))!;
    expect(claimed.spec.teacher).toMatchObject({ api_key: 'sk-teacher-plaintext' });
    await worker.fail(id, claimed.lease_token, { code: 'teacher_error', message: 'no' }, false);
    expect(await storedSecrets(id)).toBeNull();
  });

  it('erases secrets on every other ending: cancelled pending, cancelled running, failed, lease lost', async () => {
    await clearQueue();
    const pending = await createFinetune(server, { hf_token: 'hf_1' });
    await server.api(`/v1/training/jobs/${pending}/cancel`, { method: 'POST' });
    expect(await storedSecrets(pending)).toBeNull();

    const running = await createFinetune(server, { hf_token: 'hf_2' });
    const first = (await worker.claim())!;
    await server.api(`/v1/training/jobs/${running}/cancel`, { method: 'POST' });
    expect(await storedSecrets(running)).not.toBeNull(); // still running until the worker stops
    await worker.cancelled(running, first.lease_token);
    expect(await storedSecrets(running)).toBeNull();

    const retried = await createFinetune(server, { hf_token: 'hf_3' });
    const second = (await worker.claim())!;
    await worker.fail(retried, second.lease_token); // retryable: back to pending, keeps its secrets
    expect(await storedSecrets(retried)).not.toBeNull();
    await server.ctx
      .knex('jobs')
      .where({ id: retried })
      .update({ run_at: new Date(0) });
    const third = (await worker.claim())!;
    expect(third.spec.hf_token).toBe('hf_3');
    await worker.fail(retried, third.lease_token, undefined, false);
    expect(await storedSecrets(retried)).toBeNull();

    const abandoned = await createFinetune(server, { hf_token: 'hf_4' });
    await server.ctx.knex('jobs').where({ id: abandoned }).update({ max_attempts: 1 });
    await worker.claim();
    await server.ctx.knex.raw(`UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = ?`, [
      abandoned,
    ]);
    expect(await rescueExpiredLeases(server.ctx, 10)).toMatchObject({ failed: 1 });
    expect(await server.ctx.knex('jobs').where({ id: abandoned }).first('status', 'secrets')).toEqual({
      status: 'failed',
      secrets: null,
    });
  });

  it('takes the hub token again for a merge, since the parent erased its own', async () => {
    await clearQueue();
    const parent = await createFinetune(server, { hf_token: 'hf_parent' });
    const claimed = (await worker.claim())!;
    await worker.complete(parent, claimed.lease_token);
    const res = await server.api(`/v1/training/jobs/${parent}/merge`, {
      method: 'POST',
      json: { hf_token: 'hf_for_merge' },
    });
    expect(res.status).toBe(201);
    const { merge_job_id } = (await res.json()) as { merge_job_id: string };
    expect(await rawRow(merge_job_id)).not.toContain('hf_for_merge');
    const merge = (await worker.claim())!;
    expect(merge).toMatchObject({ job_id: merge_job_id, type: 'merge' });
    expect(merge.spec.hf_token).toBe('hf_for_merge');
  });

  it('takes the hub token again on resume; without one the resumed job has none', async () => {
    await clearQueue();
    const id = await createFinetune(server, { hf_token: 'hf_first' });
    const first = (await worker.claim())!;
    await worker.upload(id, first.lease_token, 'checkpoints', 'checkpoint-2', Buffer.from('ckpt'), 2);
    await worker.fail(id, first.lease_token, undefined, false);
    expect(await storedSecrets(id)).toBeNull();

    const resume = (json: unknown) => server.api(`/v1/training/jobs/${id}/resume`, { method: 'POST', json });
    expect((await resume({ hf_token: 'hf_again' })).status).toBe(200);
    expect(await rawRow(id)).not.toContain('hf_again');
    const second = (await worker.claim())!;
    expect(second).toMatchObject({ job_id: id, resume_from: { name: 'checkpoint-2' } });
    expect(second.spec.hf_token).toBe('hf_again');

    await worker.fail(id, second.lease_token, undefined, false);
    expect((await resume({})).status).toBe(200);
    expect((await worker.claim())!.spec.hf_token).toBeUndefined();
  });

  it('seals secrets an older server stored in clear', async () => {
    await clearQueue();
    const id = await createFinetune(server);
    await server.ctx
      .knex('jobs')
      .where({ id })
      .update({ secrets: JSON.stringify({ hf_token: 'hf_legacy' }) });
    expect(await sealPlaintextSecrets(server.ctx.knex, server.ctx.secretBox)).toBe(1);
    expect(await rawRow(id)).not.toContain('hf_legacy');
    expect((await worker.claim())!.spec.hf_token).toBe('hf_legacy');
  });

  it('refuses a secrets key other than the one the database recorded, unless told to rotate', async () => {
    const other = new SecretBox(randomBytes(32));
    await expect(checkSecretsKey(server.ctx.knex, server.ctx.secretBox, false)).resolves.toBeUndefined();
    await expect(checkSecretsKey(server.ctx.knex, other, false)).rejects.toThrow(/same TUNERY_SECRETS_KEY/);
    await checkSecretsKey(server.ctx.knex, other, true);
    await expect(checkSecretsKey(server.ctx.knex, server.ctx.secretBox, false)).rejects.toThrow(/ROTATE/);
    await checkSecretsKey(server.ctx.knex, server.ctx.secretBox, true); // back, for the other tests
  });

  it('fails a job whose secrets this server cannot open, and hands out the next one', async () => {
    await clearQueue();
    const unreadable = await createFinetune(server, { hf_token: 'hf_x' });
    const sealed = new SecretBox(randomBytes(32)).seal(unreadable, { hf_token: 'hf_x' });
    await server.ctx
      .knex('jobs')
      .where({ id: unreadable })
      .update({ secrets: JSON.stringify(sealed) });
    const next = await createFinetune(server);
    expect((await worker.claim())!.job_id).toBe(next);
    expect(await server.ctx.knex('jobs').where({ id: unreadable }).first('status', 'error_code')).toEqual({
      status: 'failed',
      error_code: 'invalid_config',
    });
  });
});
