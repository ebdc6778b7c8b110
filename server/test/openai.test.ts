/**
 * The OpenAI-compatible routes over HTTP, without a real worker (e2e/test/openai.test.ts drives them
 * with the openai client and a CPU worker): the error shape, how OpenAI's hyperparameters become
 * Tunery's settings, what is refused, cursor pages, a failed job's error object, tenant isolation.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fakeWorker } from './fake-worker.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

const chat = (user: string, assistant: string) =>
  JSON.stringify({
    messages: [
      { role: 'user', content: user },
      { role: 'assistant', content: assistant },
    ],
  });
const JSONL = `${chat('Say hi', 'hi')}\n${chat('Say bye', 'bye')}\n`;

describe.each(DATABASES)('OpenAI-compatible routes on %s', (db) => {
  let server: TestServer;
  let fileId: string;

  const upload = (content: string, key?: string) => {
    const form = new FormData();
    form.append('purpose', 'fine-tune');
    form.append('file', new Blob([content]), 'train.jsonl');
    return server.api('/openai/v1/files', { method: 'POST', body: form, ...(key ? { key } : {}) });
  };
  const createJob = (json: Record<string, unknown>) =>
    server.api('/openai/v1/fine_tuning/jobs', {
      method: 'POST',
      json: { model: 'smollm2-135m-instruct', training_file: fileId, ...json },
    });
  /** The Tunery job behind an OpenAI job: its stored worker spec. */
  const tuneryConfig = async (id: string) =>
    (
      (await (await server.api(`/v1/training/jobs/${id}`)).json()) as {
        config: {
          training: Record<string, unknown>;
          seed: number;
          eval_dataset_id?: string;
          output_name?: string;
        };
      }
    ).config;

  beforeAll(async () => {
    server = await startTestServer(db);
    const res = await upload(JSONL);
    expect(res.status).toBe(200);
    fileId = ((await res.json()) as { id: string }).id;
  });
  afterAll(() => server.stop());

  it("answers errors in OpenAI's shape with the status its clients type", async () => {
    const bad = await upload(`${chat('a', 'b')}\n{"messages": [{"role": "user", "content": "x"}]}\n`);
    expect(bad.status).toBe(400);
    const body = (await bad.json()) as { error: Record<string, unknown> };
    expect(body.error).toMatchObject({
      type: 'invalid_request_error',
      code: 'invalid_dataset',
      param: 'file',
    });
    expect(body.error.message).toMatch(/^line 2: .*assistant/);

    // OpenAI's keys that Tunery's datasets would drop are refused, naming the line
    const weighted = JSON.stringify({
      messages: [
        { role: 'user', content: 'a' },
        { role: 'assistant', content: 'b', weight: 0 },
      ],
    });
    const refusals: [string, string][] = [
      [`${chat('a', 'b')}\n${weighted}\n`, 'line 2: messages[1].weight is not supported.'],
      [
        `${JSON.stringify({ text: 'plain' })}\n`,
        'line 1: "text" is not supported: a line holds only "messages".',
      ],
      [`${chat('a', 'b')}\nnot json\n`, 'line 2: not valid JSON'],
    ];
    for (const [content, message] of refusals) {
      const res = await upload(content);
      expect(res.status).toBe(400);
      expect(((await res.json()) as { error: { message: string } }).error.message).toContain(message);
    }

    const anonymous = await server.api('/openai/v1/models', { key: null });
    expect(anonymous.status).toBe(401);
    expect(((await anonymous.json()) as { error: unknown }).error).toMatchObject({
      type: 'authentication_error',
    });

    const missing = await server.api('/openai/v1/models/no-such-model');
    expect(missing.status).toBe(404);
    expect(await missing.json()).toEqual({
      error: {
        message: 'No model no-such-model.',
        type: 'not_found_error',
        param: 'model',
        code: 'model_not_found',
      },
    });

    // the rest of the API keeps Tunery's shape
    const tunery = await server.api('/v1/datasets/ds_nope');
    expect(((await tunery.json()) as { error: Record<string, unknown> }).error).not.toHaveProperty('type');
  });

  it("maps OpenAI's hyperparameters onto Tunery's settings; auto keeps Tunery's defaults", async () => {
    const res = await createJob({
      suffix: 'mapped',
      seed: 11,
      method: {
        type: 'supervised',
        supervised: { hyperparameters: { n_epochs: 2, batch_size: 8, learning_rate_multiplier: 0.5 } },
      },
    });
    expect(res.status).toBe(200);
    const job = (await res.json()) as { id: string } & Record<string, unknown>;
    expect(job).toMatchObject({
      object: 'fine_tuning.job',
      status: 'queued',
      seed: 11,
      user_provided_suffix: 'mapped',
      hyperparameters: { n_epochs: 2, batch_size: 8, learning_rate_multiplier: 0.5 },
    });
    const config = await tuneryConfig(job.id);
    expect(config.training).toMatchObject({ num_epochs: 2, batch_size: 8, learning_rate: 1e-4 });
    expect(config.seed).toBe(11);
    // the suffix names the output model too (its adapter), not only the run
    expect(config.output_name).toBe('mapped');

    const auto = (await (
      await createJob({
        hyperparameters: { n_epochs: 'auto', batch_size: 'auto', learning_rate_multiplier: 'auto' },
      })
    ).json()) as { id: string; hyperparameters: unknown };
    expect(auto.hyperparameters).toEqual({ n_epochs: 3, batch_size: 4, learning_rate_multiplier: 1 });
    expect((await tuneryConfig(auto.id)).training).toMatchObject({
      num_epochs: 3,
      batch_size: 4,
      learning_rate: 2e-4,
    });
  });

  it('refuses an upload with a form field it would not use, naming the field', async () => {
    const form = new FormData();
    form.append('purpose', 'fine-tune');
    form.append('expires_after[anchor]', 'created_at');
    const chat = [
      { role: 'user', content: 'hi' },
      { role: 'assistant', content: 'hello' },
    ];
    form.append('file', new Blob([`${JSON.stringify({ messages: chat })}\n`]), 'train.jsonl');
    const res = await server.api('/openai/v1/files', { method: 'POST', body: form });
    expect(res.status).toBe(400);
    const { error } = (await res.json()) as { error: { param: string | null; message: string } };
    expect(`${error.param} ${error.message}`).toContain('expires_after');
  });

  it('refuses what it cannot honour, naming the field', async () => {
    const cases: [Record<string, unknown>, string][] = [
      [{ integrations: [{ type: 'wandb', wandb: { project: 'x' } }] }, 'integrations'],
      [{ metadata: { team: 'a' } }, 'metadata'],
      [{ method: { type: 'dpo' } }, 'method.type'],
      [
        {
          hyperparameters: { n_epochs: 1 },
          method: { type: 'supervised', supervised: { hyperparameters: {} } },
        },
        'hyperparameters',
      ],
      [{ stream: true }, 'stream'],
    ];
    for (const [fields, param] of cases) {
      const res = await createJob(fields);
      expect(res.status, JSON.stringify(fields)).toBe(400);
      const { error } = (await res.json()) as { error: { param: string; type: string } };
      expect(error.type).toBe('invalid_request_error');
      if (param !== 'stream') expect(error.param).toBe(param);
    }
  });

  it('pages jobs with after/limit, newest first', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) ids.push(((await (await createJob({})).json()) as { id: string }).id);
    const seen: string[] = [];
    let after: string | undefined;
    for (;;) {
      const query = after ? `?limit=2&after=${after}` : '?limit=2';
      const page = (await (await server.api(`/openai/v1/fine_tuning/jobs${query}`)).json()) as {
        data: { id: string }[];
        has_more: boolean;
      };
      seen.push(...page.data.map((j) => j.id));
      if (!page.has_more) break;
      after = page.data.at(-1)!.id;
    }
    expect(new Set(seen).size).toBe(seen.length);
    expect(seen.slice(0, 3)).toEqual([...ids].reverse());
    const bad = await server.api('/openai/v1/fine_tuning/jobs?after=job_nope');
    expect(bad.status).toBe(400);
  });

  it("shows a failed job's error object and its checkpoints in OpenAI's shapes", async () => {
    // the earlier jobs are ahead in the queue: cancel them so the worker claims this one
    const listed = (await (await server.api('/openai/v1/fine_tuning/jobs?limit=100')).json()) as {
      data: { id: string }[];
    };
    for (const { id } of listed.data)
      await server.api(`/openai/v1/fine_tuning/jobs/${id}/cancel`, { method: 'POST' });
    const job = (await (await createJob({})).json()) as { id: string };
    const worker = fakeWorker(server);
    const claimed = await worker.claim();
    expect(claimed?.job_id).toBe(job.id);
    const token = claimed!.lease_token;
    expect((await worker.metrics(job.id, token, [{ step: 4, phase: 'train', loss: 1.5 }])).status).toBe(200);
    expect(
      (await worker.upload(job.id, token, 'checkpoints', 'checkpoint-4', Buffer.from('w'), 4)).status,
    ).toBe(201);
    expect(
      (await worker.fail(job.id, token, { code: 'out_of_memory', message: 'OOM at step 5' }, false)).status,
    ).toBe(200);

    const failed = (await (await server.api(`/openai/v1/fine_tuning/jobs/${job.id}`)).json()) as {
      id: string;
    } & Record<string, unknown>;
    expect(failed).toMatchObject({
      status: 'failed',
      fine_tuned_model: null,
      trained_tokens: null,
      error: { code: 'out_of_memory', message: 'OOM at step 5', param: null },
    });
    const checkpoints = (await (
      await server.api(`/openai/v1/fine_tuning/jobs/${job.id}/checkpoints`)
    ).json()) as {
      data: unknown[];
    };
    expect(checkpoints.data).toEqual([
      expect.objectContaining({
        id: `ftckpt-${job.id}-4`,
        object: 'fine_tuning.job.checkpoint',
        fine_tuned_model_checkpoint: 'checkpoint-4',
        step_number: 4,
        metrics: { step: 4, train_loss: 1.5 },
      }),
    ]);
    const events = (await (
      await server.api(`/openai/v1/fine_tuning/jobs/${job.id}/events?limit=100`)
    ).json()) as {
      data: { level: string; data: { kind: string } }[];
    };
    expect(events.data[0]).toMatchObject({ level: 'error', data: { kind: 'failed' } });
  });

  it('pauses and resumes: at once when queued, after the worker stops when running, from the checkpoint', async () => {
    const post = (id: string, action: string) =>
      server.api(`/openai/v1/fine_tuning/jobs/${id}/${action}`, { method: 'POST' });
    const statusAfter = async (id: string, action: string, expected = 200) => {
      const res = await post(id, action);
      const body = (await res.json()) as { status: string; error?: { type: string; code: string } };
      expect({ action, status: res.status }).toEqual({ action, status: expected });
      return expected === 200 ? body.status : body.error?.code;
    };
    const job = (await (await createJob({})).json()) as { id: string };

    // queued: paused at once; a second pause answers it unchanged; a resume queues it again
    expect(await statusAfter(job.id, 'pause')).toBe('paused');
    expect(await statusAfter(job.id, 'pause')).toBe('paused');
    expect(await statusAfter(job.id, 'resume')).toBe('queued');
    expect(await statusAfter(job.id, 'resume', 409)).toBe('job_not_resumable');

    // running with a checkpoint: paused at once, resumable once the worker has stopped
    const worker = fakeWorker(server);
    const first = (await worker.claim())!;
    expect(first.job_id).toBe(job.id);
    expect(first.resume_from).toBeNull();
    const upload = await worker.upload(
      job.id,
      first.lease_token,
      'checkpoints',
      'checkpoint-2',
      Buffer.from('w'),
      2,
    );
    expect(upload.status).toBe(201);
    expect(await statusAfter(job.id, 'pause')).toBe('paused');
    expect(await statusAfter(job.id, 'resume', 409)).toBe('job_not_resumable');
    expect((await worker.cancelled(job.id, first.lease_token)).status).toBe(200);
    const paused = (await (await server.api(`/openai/v1/fine_tuning/jobs/${job.id}`)).json()) as {
      status: string;
    };
    expect(paused.status).toBe('paused');
    expect(await statusAfter(job.id, 'resume')).toBe('queued');
    const second = (await worker.claim())!;
    expect(second.resume_from?.name).toBe('checkpoint-2');
    expect((await worker.complete(job.id, second.lease_token)).status).toBe(200);
    expect(await statusAfter(job.id, 'pause', 409)).toBe('job_already_finished');

    // a paused job can still be cancelled, and then it is no longer paused
    const other = (await (await createJob({})).json()) as { id: string };
    expect(await statusAfter(other.id, 'pause')).toBe('paused');
    expect(await statusAfter(other.id, 'cancel')).toBe('cancelled');
    expect(await statusAfter(other.id, 'resume', 409)).toBe('job_not_resumable');

    const events = (await (await server.api(`/v1/training/jobs/${job.id}/events`)).json()) as {
      events: { kind: string }[];
    };
    expect(events.events.map((e) => e.kind)).toEqual(
      expect.arrayContaining(['paused', 'resumed', 'cancelled', 'completed']),
    );
  });

  it('evaluates on validation_file: an eval_dataset input of the job, shown back', async () => {
    // the earlier jobs are ahead in the queue: cancel them so the worker claims this one
    const listed = (await (await server.api('/openai/v1/fine_tuning/jobs?limit=100')).json()) as {
      data: { id: string }[];
    };
    for (const { id } of listed.data)
      await server.api(`/openai/v1/fine_tuning/jobs/${id}/cancel`, { method: 'POST' });
    const res = await createJob({ validation_file: fileId });
    expect(res.status).toBe(200);
    const job = (await res.json()) as { id: string; validation_file: string | null };
    expect(job.validation_file).toBe(fileId);
    expect((await tuneryConfig(job.id)).eval_dataset_id).toBe(fileId);
    const claimed = (await fakeWorker(server).claim())!;
    expect(claimed.job_id).toBe(job.id);
    expect(claimed.inputs.map((i) => i.role).sort()).toEqual(['dataset', 'eval_dataset']);
    await server.api(`/openai/v1/fine_tuning/jobs/${job.id}/cancel`, { method: 'POST' });

    const unknown = await createJob({ validation_file: 'ds_nope' });
    expect(unknown.status).toBe(404);
  });

  it("hides another tenant's files and jobs (404)", async () => {
    const other = await upload(JSONL, server.otherKey);
    const theirs = ((await other.json()) as { id: string }).id;
    expect((await server.api(`/openai/v1/files/${theirs}`)).status).toBe(404);
    expect((await server.api(`/openai/v1/files/${theirs}/content`)).status).toBe(404);
    expect((await createJob({ training_file: theirs })).status).toBe(404);
    const mine = await server.api(`/openai/v1/files/${fileId}/content`);
    expect(await mine.text()).toBe(JSONL);
    const list = (await (await server.api('/openai/v1/files', { key: server.otherKey })).json()) as {
      data: { id: string }[];
    };
    expect(list.data.map((f) => f.id)).toEqual([theirs]);
  });
});
