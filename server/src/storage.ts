import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, readdir, rename, rm, stat, statfs } from 'node:fs/promises';
import { dirname, join, relative, resolve, sep } from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { ApiError } from './errors.js';

export interface StoredObject {
  relPath: string;
  sizeBytes: number;
  sha256: string;
}

const SAFE_SEGMENT = /^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$/;

/**
 * Artifacts on local disk under the data directory. Callers name files by segments
 * (`['jobs', jobId, 'outputs', name]`); every segment must be a plain name, so nothing a user
 * sends can climb out of the data directory. An S3-compatible store would implement the same methods.
 */
export class LocalStorage {
  readonly root: string;

  constructor(
    dataDir: string,
    private readonly maxUploadBytes: number,
    private readonly quotaBytes: number,
  ) {
    this.root = resolve(dataDir, 'files');
  }

  /** The absolute path for segments, refusing anything that is not a plain name. */
  pathFor(segments: string[]): string {
    for (const segment of segments) {
      if (!SAFE_SEGMENT.test(segment) || segment === '..') {
        throw new ApiError(400, 'invalid_request', `"${segment}" is not a valid file name.`, 'file');
      }
    }
    const full = resolve(this.root, ...segments);
    if (!full.startsWith(this.root + sep))
      throw new ApiError(400, 'invalid_request', 'Path escapes the data directory.', 'file');
    return full;
  }

  absolute(relPath: string): string {
    const full = resolve(this.root, relPath);
    if (!full.startsWith(this.root + sep))
      throw new ApiError(400, 'invalid_request', 'Path escapes the data directory.', 'file');
    return full;
  }

  /** Streams `source` to disk (temp file, then rename), hashing on the way; enforces size and quota. */
  async put(segments: string[], source: Readable): Promise<StoredObject> {
    const target = this.pathFor(segments);
    await mkdir(dirname(target), { recursive: true });
    await this.checkQuota();
    const temp = `${target}.part-${process.pid}-${Date.now()}`;
    const hash = createHash('sha256');
    let size = 0;
    const limit = this.maxUploadBytes;
    try {
      await pipeline(
        source,
        async function* (chunks: AsyncIterable<Buffer>) {
          for await (const chunk of chunks) {
            size += chunk.length;
            if (size > limit) throw new ApiError(413, 'payload_too_large', `Upload exceeds ${limit} bytes.`);
            hash.update(chunk);
            yield chunk;
          }
        },
        createWriteStream(temp),
      );
      await rename(temp, target);
    } catch (err) {
      await rm(temp, { force: true });
      throw err;
    }
    return { relPath: relative(this.root, target), sizeBytes: size, sha256: hash.digest('hex') };
  }

  async putBuffer(segments: string[], data: Buffer | string): Promise<StoredObject> {
    const { Readable } = await import('node:stream');
    return this.put(segments, Readable.from([Buffer.from(data)]));
  }

  read(relPath: string, range?: { start: number; end: number }): Readable {
    return createReadStream(this.absolute(relPath), range);
  }

  async size(relPath: string): Promise<number> {
    return (await stat(this.absolute(relPath))).size;
  }

  async remove(relPath: string): Promise<void> {
    await rm(this.absolute(relPath), { force: true });
  }

  async removeTree(segments: string[]): Promise<void> {
    await rm(this.pathFor(segments), { recursive: true, force: true });
  }

  /** Refuses new uploads once the data directory's quota (or the disk itself) is full. */
  private async checkQuota(): Promise<void> {
    await mkdir(this.root, { recursive: true });
    const fs = await statfs(this.root);
    if (fs.bavail * fs.bsize < 64 * 1024 * 1024) {
      throw new ApiError(
        413,
        'payload_too_large',
        'The server is out of disk space; the upload was refused.',
      );
    }
    if (Number.isFinite(this.quotaBytes) && (await directorySize(this.root)) >= this.quotaBytes) {
      throw new ApiError(
        413,
        'payload_too_large',
        'The storage quota is used up; delete artifacts or raise TUNERY_STORAGE_QUOTA_BYTES.',
      );
    }
  }
}

/**
 * Runs `work`, which writes files and then records them in a transaction; if it fails, removes the
 * folders it may have written before rethrowing. A rollback takes the rows but never the bytes, so
 * without this a failed create would leave files nothing refers to.
 */
export async function removingOnFailure<T>(
  storage: LocalStorage,
  folders: string[][],
  work: () => Promise<T>,
): Promise<T> {
  try {
    return await work();
  } catch (err) {
    for (const folder of folders) await storage.removeTree(folder).catch(() => {});
    throw err;
  }
}

/**
 * Bytes under `dir`. Other uploads rename or remove their temp files, and deletes remove folders,
 * while this walks: an entry gone by the time it is read counts as 0 bytes (else a quota check
 * would fail an unrelated upload with ENOENT).
 */
async function directorySize(dir: string): Promise<number> {
  const ifGone =
    <T>(fallback: T) =>
    (err: NodeJS.ErrnoException): T => {
      if (err.code === 'ENOENT') return fallback;
      throw err;
    };
  let total = 0;
  for (const entry of await readdir(dir, { withFileTypes: true }).catch(ifGone([]))) {
    const full = join(dir, entry.name);
    total += entry.isDirectory()
      ? await directorySize(full)
      : await stat(full).then((s) => s.size, ifGone(0));
  }
  return total;
}
