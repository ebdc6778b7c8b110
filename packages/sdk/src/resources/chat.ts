import { APIPromise } from '../core/api-promise.js';
import type { RequestOptions } from '../core/client.js';
import { APIError } from '../core/error.js';
import { APIResource } from '../core/resource.js';
import { parseServerSentEvents } from '../core/stream.js';
import type { ChatCompletion, ChatCompletionChunk, ChatCompletionCreateParams } from '../types.js';

/**
 * Chat with what Tunery serves (`/openai/v1/chat/completions`): your fine-tuned models (`model_…`),
 * adapters by name, catalog models, or `default` (the model you activated).
 */
export class Chat extends APIResource {
  readonly completions: ChatCompletions = new ChatCompletions(this._client);
}

export class ChatCompletions extends APIResource {
  /**
   * One answer; with `stream: true`, an async iterator of chunks as a serving worker generates them.
   *
   * ```ts
   * const answer = await tunery.chat.completions.create({ model: job.output_model_id!, messages });
   * for await (const chunk of await tunery.chat.completions.create({ model, messages, stream: true }))
   *   process.stdout.write(chunk.choices[0]?.delta.content ?? '');
   * ```
   */
  create(
    body: ChatCompletionCreateParams & { stream?: false | null },
    options?: RequestOptions,
  ): APIPromise<ChatCompletion>;
  create(
    body: ChatCompletionCreateParams & { stream: true },
    options?: RequestOptions,
  ): APIPromise<AsyncIterable<ChatCompletionChunk>>;
  create(
    body: ChatCompletionCreateParams,
    options?: RequestOptions,
  ): APIPromise<ChatCompletion | AsyncIterable<ChatCompletionChunk>> {
    if (!body.stream) return this._client.post('/openai/v1/chat/completions', { body, ...options });
    const response = this._client
      .request<ReadableStream<Uint8Array>>('post', '/openai/v1/chat/completions', {
        body,
        parseAs: 'stream',
        ...options,
      })
      .withResponse();
    return new APIPromise(response.then((r) => ({ ...r, data: chunks(r.data, r.response) })));
  }
}

/** The stream's chunks until `[DONE]`; an error the worker sent midway is thrown as an APIError. */
async function* chunks(
  body: ReadableStream<Uint8Array>,
  response: Response,
): AsyncGenerator<ChatCompletionChunk> {
  for await (const event of parseServerSentEvents(body)) {
    if (event.data === '[DONE]') return;
    const data = JSON.parse(event.data) as ChatCompletionChunk | { error: unknown };
    if ('error' in data) throw APIError.generate(502, data, undefined, response.headers);
    yield data;
  }
}
