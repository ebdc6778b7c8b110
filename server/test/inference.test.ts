import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { completedJob } from './fixtures.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

interface Claimed {
  request_id: string;
  request_token: string;
  target: {
    name: string;
    base_source: string | null;
    adapter: { key: string; files: { file_id: string; name: string }[] } | null;
  };
  input: { kind: string; messages?: { role: string; content: string }[]; prompt?: string };
  params: { max_tokens: number; temperature: number; top_p: number; stop: string[]; seed: number | null };
}

describe.each(DATABASES)('inference on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(async () => {
    await server?.stop();
  });

  const asWorker = (path: string, json: unknown) =>
    server.api(path, { key: server.workerToken, method: 'POST', json });
  const claim = async (waitSeconds = 10): Promise<Claimed | null> => {
    const res = await asWorker('/v1/workers/inference/claim', {
      worker_id: 'server-1',
      wait_seconds: waitSeconds,
    });
    return res.status === 204 ? null : ((await res.json()) as Claimed);
  };
  const report = async (claimed: Claimed, chunk: Record<string, unknown>) =>
    (
      await asWorker(`/v1/workers/inference/${claimed.request_id}/report`, {
        request_token: claimed.request_token,
        worker_id: 'server-1',
        ...chunk,
      })
    ).json();
  /** Serves the next request: the text in pieces, then done. Returns what was claimed. */
  async function serveOnce(pieces: string[], finish = 'stop') {
    const claimed = (await claim())!;
    for (const text of pieces) expect(await report(claimed, { text })).toEqual({ cancelled: false });
    await report(claimed, {
      done: true,
      finish_reason: finish,
      usage: { prompt_tokens: 5, completion_tokens: pieces.length },
    });
    return claimed;
  }
  const chat = (json: Record<string, unknown>) =>
    server.api('/openai/v1/chat/completions', { method: 'POST', json });

  it('answers 503 no_serving_worker while no worker serves, in OpenAI’s error shape', async () => {
    const res = await chat({ model: 'smollm2-135m-instruct', messages: [{ role: 'user', content: 'hi' }] });
    expect(res.status).toBe(503);
    expect((await res.json()).error).toMatchObject({ code: 'no_serving_worker', type: 'server_error' });
  });

  it('relays a chat completion from the worker that claimed it, whole', async () => {
    expect(await claim(0)).toBeNull(); // announces the worker
    const [res, claimed] = await Promise.all([
      chat({
        model: 'smollm2-135m-instruct',
        messages: [
          { role: 'developer', content: 'Be brief.' },
          {
            role: 'user',
            content: [
              { type: 'text', text: 'Say ' },
              { type: 'text', text: 'hi' },
            ],
          },
        ],
        max_completion_tokens: 8,
        temperature: 0,
        stop: 'END',
        seed: 7,
      }),
      serveOnce(['Hel', 'lo']),
    ]);
    expect(claimed.target).toMatchObject({ name: 'smollm2-135m-instruct', adapter: null });
    expect(claimed.target.base_source).toBeTruthy();
    expect(claimed.input).toEqual({
      kind: 'chat',
      messages: [
        { role: 'system', content: 'Be brief.' },
        { role: 'user', content: 'Say hi' },
      ],
    });
    expect(claimed.params).toEqual({ max_tokens: 8, temperature: 0, top_p: 1, stop: ['END'], seed: 7 });
    expect(res.status).toBe(200);
    const body = await res.json();
    expect(body).toMatchObject({
      object: 'chat.completion',
      model: 'smollm2-135m-instruct',
      choices: [{ index: 0, message: { role: 'assistant', content: 'Hello' }, finish_reason: 'stop' }],
      usage: { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 },
    });
    expect(body.id).toMatch(/^chatcmpl-/);
    // Nothing is kept once the answer is out.
    expect(Number((await server.ctx.knex('inference_requests').count({ n: '*' }).first())?.n)).toBe(0);
  });

  it('streams a completion as server-sent events, with usage when asked, then [DONE]', async () => {
    const [res] = await Promise.all([
      server.api('/openai/v1/completions', {
        method: 'POST',
        json: {
          model: 'smollm2-135m-instruct',
          prompt: 'Once',
          stream: true,
          stream_options: { include_usage: true },
        },
      }),
      serveOnce(['upon', ' a', ' time'], 'length'),
    ]);
    expect(res.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const events = (await res.text())
      .split('\n\n')
      .filter(Boolean)
      .map((e) => e.replace(/^data: /, ''));
    expect(events.at(-1)).toBe('[DONE]');
    const chunks = events.slice(0, -1).map((e) => JSON.parse(e));
    expect(chunks.map((c) => c.choices[0]?.text ?? '').join('')).toBe('upon a time');
    expect(chunks.every((c) => c.object === 'text_completion')).toBe(true);
    expect(chunks.at(-2).choices[0].finish_reason).toBe('length');
    expect(chunks.at(-1)).toMatchObject({ choices: [], usage: { completion_tokens: 3, total_tokens: 8 } });
  });

  it('serves a fine-tuned model as its adapter over its base; the worker downloads only those files', async () => {
    const { modelId } = await completedJob(server, {
      baseModel: 'smollm2-135m-instruct',
      files: { 'adapter_model.safetensors': 'weights', 'adapter_config.json': '{"r":8}' },
    });
    const [res, claimed] = await Promise.all([
      chat({ model: modelId, messages: [{ role: 'user', content: 'hi' }] }),
      (async () => {
        const c = (await claim())!;
        const files = c.target.adapter!.files;
        expect(files.map((f) => f.name).sort()).toEqual(['adapter_config.json', 'adapter_model.safetensors']);
        const download = (fileId: string, token: string) =>
          server.api(`/v1/workers/files/${fileId}`, {
            key: server.workerToken,
            headers: { 'x-lease-token': token },
          });
        const config = files.find((f) => f.name === 'adapter_config.json')!;
        expect(await (await download(config.file_id, c.request_token)).text()).toBe('{"r":8}');
        expect((await download(config.file_id, 'infreq_not-the-token')).status).toBe(404);
        await report(c, {
          text: 'ok',
          done: true,
          finish_reason: 'stop',
          usage: { prompt_tokens: 1, completion_tokens: 1 },
        });
        return c;
      })(),
    ]);
    expect(claimed.target.base_source).toBeTruthy();
    expect((await res.json()).choices[0].message.content).toBe('ok');
  });

  it('answers model "default" with the model the tenant activated', async () => {
    const none = await chat({ model: 'default', messages: [{ role: 'user', content: 'x' }] });
    expect(none.status).toBe(404);
    const { modelId, jobId } = await completedJob(server, { baseModel: 'smollm2-135m-instruct' });
    const activated = await server.api(`/v1/models/${modelId}/activate`, { method: 'POST', json: {} });
    expect(activated.status).toBe(200);
    const [res, claimed] = await Promise.all([
      chat({ model: 'default', messages: [{ role: 'user', content: 'hi' }] }),
      serveOnce(['fine']),
    ]);
    expect(claimed.target.adapter?.key).toBe(jobId);
    expect((await res.json()).choices[0].message.content).toBe('fine');
  });

  it('refuses fields it does not implement and models that do not exist, in OpenAI’s shape', async () => {
    for (const [extra, param] of [
      [{ tools: [] }, 'tools'],
      [{ n: 2 }, 'n'],
      [{ logprobs: true }, 'logprobs'],
      // options of a stream, on a request that asks for none (OpenAI refuses it too)
      [{ stream_options: { include_usage: true } }, 'stream_options'],
      [{ stream: false, stream_options: { include_usage: true } }, 'stream_options'],
    ] as const) {
      const res = await chat({
        model: 'smollm2-135m-instruct',
        messages: [{ role: 'user', content: 'x' }],
        ...extra,
      });
      expect(res.status, param).toBe(400);
      const error = (await res.json()).error;
      expect(error.type).toBe('invalid_request_error');
      expect(`${error.param} ${error.message}`).toContain(param);
    }
    const missing = await chat({ model: 'no-such-model', messages: [{ role: 'user', content: 'x' }] });
    expect(missing.status).toBe(404);
    expect((await missing.json()).error).toMatchObject({ code: 'model_not_found', param: 'model' });
  });

  it('refuses a report with another request token and relays nothing of it', async () => {
    expect(await claim(0)).toBeNull(); // the worker is seen serving
    const res = chat({ model: 'smollm2-135m-instruct', messages: [{ role: 'user', content: 'x' }] });
    const claimed = (await claim())!;
    const forged = await asWorker(`/v1/workers/inference/${claimed.request_id}/report`, {
      request_token: 'infreq_not-this-one',
      worker_id: 'server-1',
      text: 'forged ',
    });
    expect(forged.status).toBe(409);
    expect((await forged.json()).error).toMatchObject({ code: 'lease_lost', param: 'request_token' });
    await report(claimed, { text: 'real', done: true, finish_reason: 'stop' });
    const answer = await (await res).json();
    expect(answer.choices[0].message.content).toBe('real');
  });

  it('tells the worker to stop when the caller leaves, and passes a worker’s error on', async () => {
    const res = chat({
      model: 'smollm2-135m-instruct',
      messages: [{ role: 'user', content: 'x' }],
      stream: true,
    });
    const claimed = (await claim())!;
    expect(await report(claimed, { text: 'a' })).toEqual({ cancelled: false });
    const streaming = await res;
    await streaming.body?.cancel();
    let answer = { cancelled: false };
    for (let i = 0; i < 200 && !answer.cancelled; i++) {
      answer = await report(claimed, { text: 'b' });
      if (!answer.cancelled) await new Promise((r) => setTimeout(r, 25));
    }
    expect(answer).toEqual({ cancelled: true });

    const [failed] = await Promise.all([
      chat({ model: 'smollm2-135m-instruct', messages: [{ role: 'user', content: 'x' }] }),
      (async () => {
        const c = (await claim())!;
        await report(c, { done: true, error: { code: 'out_of_memory', message: 'The model did not fit.' } });
      })(),
    ]);
    expect(failed.status).toBe(502);
    expect((await failed.json()).error).toMatchObject({
      code: 'out_of_memory',
      message: 'The model did not fit.',
    });

    // A code the spec does not list reaches the caller as `inference_error`, with the worker's message.
    const [odd] = await Promise.all([
      chat({ model: 'smollm2-135m-instruct', messages: [{ role: 'user', content: 'x' }] }),
      (async () => {
        const c = (await claim())!;
        await report(c, { done: true, error: { code: 'gpu_on_fire', message: 'It is hot.' } });
      })(),
    ]);
    expect(odd.status).toBe(502);
    expect((await odd.json()).error).toMatchObject({ code: 'inference_error', message: 'It is hot.' });
  });
});
