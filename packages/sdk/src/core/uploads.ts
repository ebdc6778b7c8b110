// Turning what a caller has (a path, bytes, a Blob, a stream, JSONL text) into a multipart body that
// can be rebuilt for every attempt.
import { TuneryError } from './error.js';

/** A file to upload: a path on disk (Node), bytes, a Blob/File (see `toFile`), or a stream of bytes. */
export type Uploadable =
  | string
  | Uint8Array
  | ArrayBuffer
  | Blob
  | ReadableStream<Uint8Array>
  | AsyncIterable<Uint8Array>;

/** A source of the file's bytes that can be read once per attempt. */
export interface ReplayableFile {
  name: string;
  blob(): Promise<Blob>;
}

/**
 * Paths are re-opened for every attempt (lazily, without reading the file into memory); bytes and
 * Blobs are immutable already; a stream can be read only once, so it is buffered on first use.
 */
export function replayableFile(file: Uploadable, name?: string): ReplayableFile {
  if (typeof file === 'string') {
    return { name: name ?? baseName(file), blob: () => blobFromPath(file) };
  }
  if (file instanceof Blob) {
    const fileName = name ?? ('name' in file && typeof file.name === 'string' ? file.name : 'data.jsonl');
    return { name: fileName, blob: async () => file };
  }
  if (file instanceof Uint8Array || file instanceof ArrayBuffer) {
    const blob = new Blob([file as BlobPart]);
    return { name: name ?? 'data.jsonl', blob: async () => blob };
  }
  let buffered: Promise<Blob> | undefined;
  return {
    name: name ?? 'data.jsonl',
    blob: () => {
      buffered ??= blobFromStream(file);
      return buffered;
    },
  };
}

/** A file to upload could not be read: it does not exist, is a directory, or is not readable. */
export class FileReadError extends TuneryError {
  override name = 'FileReadError';
  constructor(
    /** The path as given. */
    readonly path: string,
    cause: unknown,
  ) {
    const reason = (cause as { code?: string }).code ?? (cause as Error).message;
    super(`Cannot read the file to upload, ${path}: ${reason}.`);
    this.cause = cause;
  }
}

async function blobFromPath(path: string): Promise<Blob> {
  const fs = await import('node:fs');
  try {
    // openAsBlob checks only that the path exists; a directory fails when read, so check it here.
    if ((await fs.promises.stat(path)).isDirectory())
      throw Object.assign(new Error('a directory'), { code: 'EISDIR' });
    return await fs.openAsBlob(path);
  } catch (err) {
    throw new FileReadError(path, err);
  }
}

/** What `toFile` turns into a File: the same kinds as an upload takes, but a string is the file's contents (e.g. JSONL), not a path. */
export type ToFileInput = Uploadable;

/**
 * A File with `name` from contents in memory: JSONL text, bytes, a Blob or a stream (read now). A
 * string here is the file's contents, not a path; pass a path straight to `upload` instead.
 *
 * ```ts
 * const file = await toFile(rows.map((r) => JSON.stringify(r)).join('\n'), 'train.jsonl');
 * await tunery.datasets.upload({ file, name: 'support-tickets' });
 * ```
 */
export async function toFile(
  contents: ToFileInput,
  name: string,
  options: { type?: string } = {},
): Promise<File> {
  const type = options.type ?? (name.endsWith('.jsonl') ? 'application/jsonl' : '');
  const parts: BlobPart[] =
    typeof contents === 'string' || contents instanceof Blob
      ? [contents]
      : contents instanceof Uint8Array || contents instanceof ArrayBuffer
        ? [contents as BlobPart]
        : [await blobFromStream(contents)];
  return new File(parts, name, { type });
}

async function blobFromStream(stream: ReadableStream<Uint8Array> | AsyncIterable<Uint8Array>): Promise<Blob> {
  if (stream instanceof ReadableStream) return new Response(stream).blob();
  const chunks: BlobPart[] = [];
  for await (const chunk of stream) chunks.push(chunk as BlobPart);
  return new Blob(chunks);
}

function baseName(path: string): string {
  return path.split(/[\\/]/).pop() || 'data.jsonl';
}
