// Turning what a caller has (a path, bytes, a Blob, a stream) into a multipart body that can be
// rebuilt for every attempt.

/** A file to upload: a path on disk (Node), bytes, a Blob/File, or a stream of bytes. */
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

async function blobFromPath(path: string): Promise<Blob> {
  const fs = await import('node:fs');
  return fs.openAsBlob(path);
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
