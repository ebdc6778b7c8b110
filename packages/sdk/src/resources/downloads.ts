// Shared by the download methods: a Range option and saving a stream to disk (Node only).
import type { APIPromise } from '../core/api-promise.js';
import type { RequestOptions } from '../core/client.js';

export interface DownloadOptions extends RequestOptions {
  /** A single byte range, e.g. `bytes=0-1023` or `bytes=1024-` (the server answers 206). */
  range?: string | undefined;
}

/** Request options with `range` turned into the `Range` header. */
export function withRange(options: DownloadOptions | undefined): RequestOptions {
  const { range, ...rest } = options ?? {};
  return range ? { ...rest, headers: { ...rest.headers, Range: range } } : rest;
}

/** Writes a downloaded stream to `path` (Node). Resolves with the number of bytes written. */
export async function downloadToPath(
  download: APIPromise<ReadableStream<Uint8Array>>,
  path: string,
): Promise<number> {
  const [{ createWriteStream }, { Readable, Transform }, { pipeline }] = await Promise.all([
    import('node:fs'),
    import('node:stream'),
    import('node:stream/promises'),
  ]);
  const body = await download;
  let bytes = 0;
  const count = new Transform({
    transform(chunk: Uint8Array, _encoding, done) {
      bytes += chunk.byteLength;
      done(null, chunk);
    },
  });
  await pipeline(
    Readable.fromWeb(body as import('node:stream/web').ReadableStream),
    count,
    createWriteStream(path),
  );
  return bytes;
}
