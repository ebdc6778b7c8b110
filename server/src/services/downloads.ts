/** Streaming a stored file to a client, whole or one byte range (resumable downloads). */
import { pipeline } from 'node:stream/promises';
import type { Request, Response } from 'express';
import type { AppContext } from '../context.js';
import { ApiError, notFound } from '../errors.js';
import { jobOfMemberToken } from '../queue/gang.js';
import type { JobRow } from '../queue/types.js';
import { inferenceRequestReads } from './inference.js';
import { filesOfJob } from './job-spec.js';

export interface DownloadableFile {
  name: string;
  rel_path: string;
  size_bytes: number | string;
  sha256: string;
}

type ByteRange = { start: number; end: number };

/**
 * The single byte range a `Range` header asks for: undefined to send the whole file (no header,
 * or one we do not serve, such as several ranges), or 416 when it lies outside the file.
 */
export function parseRange(header: string | undefined, size: number): ByteRange | undefined {
  if (!header) return undefined;
  const match = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!match || (match[1] === '' && match[2] === '')) return undefined;
  const [, first, last] = match;
  let range: ByteRange;
  if (first === '') {
    // suffix form: the last N bytes
    const suffix = Number(last);
    range = { start: Math.max(0, size - suffix), end: size - 1 };
    if (suffix === 0) throw unsatisfiable(header, size);
  } else {
    range = { start: Number(first), end: last === '' ? size - 1 : Math.min(Number(last), size - 1) };
  }
  if (range.start >= size || range.start > range.end) throw unsatisfiable(header, size);
  return range;
}

const unsatisfiable = (header: string, size: number) =>
  new ApiError(416, 'range_not_satisfiable', `Range ${header} is outside the ${size}-byte file.`, 'Range', {
    'Content-Range': `bytes */${size}`,
  });

/** Sends a stored file: 200 with the whole file, or 206 with the requested range. ETag is its SHA-256. */
export async function sendStoredFile(
  ctx: Pick<AppContext, 'storage'>,
  req: Request,
  res: Response,
  file: DownloadableFile,
): Promise<void> {
  const size = Number(file.size_bytes);
  const range = parseRange(req.headers.range, size);
  res.setHeader('Accept-Ranges', 'bytes');
  res.setHeader('ETag', `"${file.sha256}"`);
  res.setHeader('Content-Type', 'application/octet-stream');
  res.setHeader('Content-Disposition', `attachment; filename="${file.name}"`);
  if (range) {
    res.status(206);
    res.setHeader('Content-Range', `bytes ${range.start}-${range.end}/${size}`);
    res.setHeader('Content-Length', String(range.end - range.start + 1));
  } else {
    res.status(200);
    res.setHeader('Content-Length', String(size));
  }
  if (req.method === 'HEAD' || size === 0) {
    res.end();
    return;
  }
  await pipeline(ctx.storage.read(file.rel_path, range), res);
}

/**
 * The file a worker asks for, when the job whose live lease it presents (`X-Lease-Token`) reads it:
 * an input or one of the job's checkpoints. Anything else, including every file of another tenant's
 * job, is 404 as if it did not exist: a worker token alone opens nothing.
 */
export async function fileForLease(
  ctx: AppContext,
  fileId: string,
  leaseToken: string,
): Promise<DownloadableFile> {
  const missing = notFound('file', fileId, 'file_id');
  const job =
    ((await ctx.knex('jobs').where({ lease_token: leaseToken, status: 'running' }).first()) as
      | JobRow
      | undefined) ??
    // a gang member above rank 0 presents its own member token
    (await jobOfMemberToken(ctx, leaseToken)) ??
    undefined;
  // A serving worker presents its inference request's token for the model files it loads.
  const readable = job
    ? (await filesOfJob(ctx, job)).has(fileId)
    : await inferenceRequestReads(ctx, leaseToken, fileId);
  if (!readable) throw missing;
  const file = (await ctx.knex('files').where({ id: fileId }).first()) as DownloadableFile | undefined;
  if (!file) throw missing;
  return file;
}
