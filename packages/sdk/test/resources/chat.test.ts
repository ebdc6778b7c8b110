import { HttpResponse, http } from 'msw';
import { describe, expect, it } from 'vitest';
import { APIError, type ChatCompletionChunk } from '../../src/index.js';
import { BASE_URL, useMockServer } from '../helpers.js';

const { server, client } = useMockServer();
const URL = `${BASE_URL}/openai/v1/chat/completions`;
const ask = { model: 'model_1', messages: [{ role: 'user' as const, content: 'hi' }] };
const head = { id: 'chatcmpl-1', object: 'chat.completion.chunk' as const, created: 1, model: 'model_1' };
const sse = (...events: string[]) =>
  new HttpResponse(events.map((data) => `data: ${data}\n\n`).join(''), {
    headers: { 'content-type': 'text/event-stream' },
  });

describe('chat.completions', () => {
  it('answers whole, sending the request as given', async () => {
    let sent: unknown;
    server.use(
      http.post(URL, async ({ request }) => {
        sent = await request.json();
        return HttpResponse.json({
          id: 'chatcmpl-1',
          object: 'chat.completion',
          created: 1,
          model: 'model_1',
          choices: [
            {
              index: 0,
              message: { role: 'assistant', content: 'hello' },
              finish_reason: 'stop',
              logprobs: null,
            },
          ],
          usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 },
        });
      }),
    );
    const answer = await client().chat.completions.create({ ...ask, temperature: 0 });
    expect(answer.choices[0]?.message.content).toBe('hello');
    expect(sent).toEqual({ ...ask, temperature: 0 });
  });

  it('streams chunks until [DONE]', async () => {
    const delta = (content: string, finish: 'stop' | null = null) =>
      JSON.stringify({ ...head, choices: [{ index: 0, delta: { content }, finish_reason: finish }] });
    server.use(http.post(URL, () => sse(delta('hel'), delta('lo'), delta('', 'stop'), '[DONE]')));
    const chunks: ChatCompletionChunk[] = [];
    for await (const chunk of await client().chat.completions.create({ ...ask, stream: true }))
      chunks.push(chunk);
    expect(chunks.map((c) => c.choices[0]?.delta.content).join('')).toBe('hello');
    expect(chunks.at(-1)?.choices[0]?.finish_reason).toBe('stop');
  });

  it('throws the error a worker sent midway as an APIError with its code', async () => {
    const error = {
      error: { message: 'The model did not fit.', type: 'server_error', param: null, code: 'out_of_memory' },
    };
    server.use(
      http.post(URL, () =>
        sse(
          JSON.stringify({ ...head, choices: [{ index: 0, delta: { content: 'a' }, finish_reason: null }] }),
          JSON.stringify(error),
          '[DONE]',
        ),
      ),
    );
    const read = async () => {
      let text = '';
      for await (const chunk of await client().chat.completions.create({ ...ask, stream: true }))
        text += chunk.choices[0]?.delta.content ?? '';
      return text;
    };
    const failure = await read().catch((e: unknown) => e);
    expect(failure).toBeInstanceOf(APIError);
    expect(failure).toMatchObject({ code: 'out_of_memory', message: expect.stringContaining('did not fit') });
  });
});
