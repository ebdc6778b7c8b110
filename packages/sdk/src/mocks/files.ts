// Made-up file contents with real sizes and checksums.
import type { components } from '../generated/api.js';
import { MockHttpError } from './errors.js';
import { sha256Hex } from './sha256.js';
import { type MockState, newId, now, type StoredBytes } from './state.js';

const encoder = new TextEncoder();

/** Stores `content` (or deterministic filler of `size` bytes) as a file and returns it. */
export function storeFile(
  state: MockState,
  name: string,
  content: string | Uint8Array,
  size?: number,
): StoredBytes {
  let bytes = typeof content === 'string' ? encoder.encode(content) : content;
  if (size !== undefined && size > bytes.length) {
    const filled = new Uint8Array(size);
    for (let i = 0; i < size; i++) filled[i] = bytes.length ? (bytes[i % bytes.length] ?? 0) : i & 0xff;
    bytes = filled;
  }
  const file: StoredBytes = {
    id: newId(state, 'file'),
    name,
    bytes,
    sha256: sha256Hex(bytes),
    createdAt: now(),
  };
  state.files.set(file.id, file);
  return file;
}

/** Where the server shows a job's outputs: relative to its data directory. */
export const outputsDir = (jobId: string) => `files/jobs/${jobId}/outputs`;

/** The spec's OutputFile view of job `jobId`'s stored file, downloadable at `downloadPath`. */
export function outputFile(
  file: StoredBytes,
  jobId: string,
  downloadPath: string,
): components['schemas']['OutputFile'] {
  return {
    name: file.name,
    path: `${outputsDir(jobId)}/${file.name}`,
    size_bytes: file.bytes.length,
    size_mb: Math.round((file.bytes.length / 1e6) * 100) / 100,
    sha256: file.sha256,
    download_url: downloadPath,
  };
}

export function jobFiles(state: MockState, jobId: string): Map<string, StoredBytes> {
  let files = state.outputs.get(jobId);
  if (!files) {
    files = new Map();
    state.outputs.set(jobId, files);
  }
  return files;
}

/**
 * Answers a download, honouring a single `Range` (`bytes=a-b`, `bytes=a-`, `bytes=-n`): 200 with the
 * whole file, 206 with the range, or a 416 `range_not_satisfiable` error when the range does not fit.
 */
export function fileResponse(file: StoredBytes, range: string | null): Response {
  const etag = `"${file.sha256}"`;
  const size = file.bytes.length;
  if (!range) {
    return new Response(file.bytes as BodyInit, {
      status: 200,
      headers: {
        'Content-Type': 'application/octet-stream',
        'Content-Length': String(size),
        ETag: etag,
        'Accept-Ranges': 'bytes',
      },
    });
  }
  const match = /^bytes=(\d*)-(\d*)$/.exec(range.trim());
  if (!match || (match[1] === '' && match[2] === '')) throw rangeNotSatisfiable(size);
  let start: number;
  let end: number;
  if (match[1] === '') {
    start = Math.max(0, size - Number(match[2]));
    end = size - 1;
  } else {
    start = Number(match[1]);
    end = match[2] === '' ? size - 1 : Math.min(Number(match[2]), size - 1);
  }
  if (start >= size || start > end) throw rangeNotSatisfiable(size);
  const part = file.bytes.slice(start, end + 1);
  return new Response(part as BodyInit, {
    status: 206,
    headers: {
      'Content-Type': 'application/octet-stream',
      'Content-Length': String(part.length),
      'Content-Range': `bytes ${start}-${end}/${size}`,
      ETag: etag,
    },
  });
}

const rangeNotSatisfiable = (size: number) =>
  new MockHttpError(416, 'range_not_satisfiable', `Range does not fit the ${size}-byte file.`, 'Range');
