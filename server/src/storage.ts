import { createHash, type Hash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import {
  chmod,
  type FileHandle,
  mkdir,
  open,
  readdir,
  rename,
  rm,
  rmdir,
  stat,
  statfs,
} from 'node:fs/promises';
import { dirname, join, posix, relative, resolve, sep } from 'node:path';
import { Readable } from 'node:stream';
import { ApiError } from './errors.js';

export interface StoredObject {
  relPath: string;
  sizeBytes: number;
  sha256: string;
}

const SAFE_SEGMENT = /^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$/;

/**
 * Unfinished files live under `files/.uploads/`, at the path they will have once finished
 * (`.uploads/datasets/ds_1/data.jsonl` becomes `datasets/ds_1/data.jsonl`). No stored name can
 * start with a dot (SAFE_SEGMENT), so a part never collides with a finished file.
 */
export const PARTS_DIR = '.uploads';
/** The folder of TUNERY_DATA_DIR that holds every stored file. */
const STORE_DIR = 'files';
/** Stored files are the server's alone: readable by its user only. */
const DIR_MODE = 0o700;
const FILE_MODE = 0o600;
/** Writes stop while less than this is free on the data directory's disk. */
const MIN_FREE_BYTES = 64 * 1024 * 1024;
/** A writer re-checks the free disk space after every this many bytes. */
const DISK_CHECK_BYTES = 16 * 1024 * 1024;

const tooLarge = (limit: number) => new ApiError(413, 'payload_too_large', `Upload exceeds ${limit} bytes.`);
const quotaUsedUp = () =>
  new ApiError(
    413,
    'payload_too_large',
    'The storage quota is used up; delete artifacts or raise TUNERY_STORAGE_QUOTA_BYTES.',
  );
const diskFull = () =>
  new ApiError(413, 'payload_too_large', 'The server is out of disk space; the upload was refused.');
const isMissing = (err: unknown) => (err as NodeJS.ErrnoException).code === 'ENOENT';
/** The size of the file at `path`; 0 when there is none. */
const sizeOf = (path: string): Promise<number> =>
  stat(path).then(
    (s) => s.size,
    (err) => {
      if (isMissing(err)) return 0;
      throw err;
    },
  );

/**
 * Artifacts on local disk under the data directory. Callers name files by segments
 * (`['jobs', jobId, 'outputs', name]`); every segment must be a plain name, so nothing a user
 * sends can climb out of the data directory. An S3-compatible store would implement the same methods.
 *
 * Every byte is written through a `PartWriter`, which enforces the size limit, the quota and the
 * free disk space chunk by chunk. Quota accounting is in memory: `usedBytes` counts everything
 * under the root (finished files and parts) and moves with each write and removal, so concurrent
 * uploads reserve their bytes as they arrive and two that only fit one at a time cannot both finish.
 * A walk of the tree sets it at start and corrects it whenever nothing is being written.
 */
export class LocalStorage {
  readonly root: string;
  /** Bytes under the root; undefined until the first walk (only kept when a quota is set). */
  private usedBytes: number | undefined;
  private accounting: Promise<void> | undefined;
  /** The open writer of each part (by final relative path): a resumed upload takes over from it. */
  private readonly writers = new Map<string, PartWriter>();
  /** Finished parts whose rows are in a caller's open transaction (see `removingOnFailure`). */
  private readonly deferred = new Set<PartWriter>();
  /** Bytes written by uploads since the server started (the operator's metrics). */
  bytesReceived = 0;

  constructor(
    dataDir: string,
    readonly maxUploadBytes: number,
    private readonly quotaBytes: number,
  ) {
    this.root = resolve(dataDir, STORE_DIR);
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

  /**
   * How a stored file is shown to tenants: relative to `TUNERY_DATA_DIR` (`files/jobs/…`), as the
   * seeds document their paths. The server's absolute directories never reach a response.
   */
  shownPath(relPath: string): string {
    return posix.join(STORE_DIR, relPath);
  }

  absolute(relPath: string): string {
    const full = resolve(this.root, relPath);
    if (!full.startsWith(this.root + sep))
      throw new ApiError(400, 'invalid_request', 'Path escapes the data directory.', 'file');
    return full;
  }

  /** Where the unfinished file for `relPath` lives. */
  partPath(relPath: string): string {
    return join(this.root, PARTS_DIR, relPath);
  }

  /**
   * Start-up: creates the root (0700), gives every stored file 0600 and folder 0700 (data dirs
   * written by older versions had 0644/0755), and counts the bytes for the quota.
   */
  async prepare(): Promise<void> {
    await mkdir(this.root, { recursive: true, mode: DIR_MODE });
    const total = await walkTree(this.root, async (path, isDir) => {
      await chmod(path, isDir ? DIR_MODE : FILE_MODE).catch(() => {});
    });
    if (this.quotaLimited) this.usedBytes = total;
  }

  /**
   * Opens the unfinished file for `segments`. `offset` 0 starts it afresh; a larger offset appends
   * to a part that must hold exactly `offset` bytes (a resumed upload), else `409
   * upload_offset_mismatch`. A writer already open on the same part is stopped first: the newest
   * request for a file wins, so a retry after a dropped connection never races the dead one.
   */
  async openPart(segments: string[], offset = 0): Promise<PartWriter> {
    const relPath = relative(this.root, this.pathFor(segments));
    for (let previous = this.writers.get(relPath); previous; previous = this.writers.get(relPath)) {
      previous.supersede();
      await previous.closed;
    }
    // Registered before any await, so a request arriving meanwhile takes over from this one.
    const writer = new PartWriter(this, relPath);
    this.writers.set(relPath, writer);
    try {
      await this.checkFreeDisk();
      await this.ensureAccounted();
      if (this.usedBytes !== undefined && this.usedBytes >= this.quotaBytes) throw quotaUsedUp();
      await writer.open(offset);
      return writer;
    } catch (err) {
      await writer.keep();
      throw err;
    }
  }

  /**
   * Bytes already received for `segments` (0 when none). Stops a writer still open on it first, so
   * the answer is final: a client resuming after a dropped connection continues from exactly there.
   */
  async receivedBytes(segments: string[]): Promise<number> {
    const relPath = relative(this.root, this.pathFor(segments));
    const open = this.writers.get(relPath);
    if (open) {
      open.supersede();
      await open.closed;
    }
    return sizeOf(this.partPath(relPath));
  }

  /** Streams `source` to disk and moves it into place at once (for files no database row waits on). */
  async put(segments: string[], source: AsyncIterable<Buffer>): Promise<StoredObject> {
    const writer = await this.openPart(segments);
    try {
      for await (const chunk of source) await writer.write(chunk);
      const stored = await writer.finish();
      await writer.commit();
      return stored;
    } catch (err) {
      await writer.discard();
      throw err;
    }
  }

  async putBuffer(segments: string[], data: Buffer | string): Promise<StoredObject> {
    return this.put(segments, Readable.from([Buffer.from(data)]));
  }

  read(relPath: string, range?: { start: number; end: number }): Readable {
    return createReadStream(this.absolute(relPath), range);
  }

  async size(relPath: string): Promise<number> {
    return (await stat(this.absolute(relPath))).size;
  }

  async remove(relPath: string): Promise<void> {
    const path = this.absolute(relPath);
    const freed = this.quotaLimited ? await sizeOf(path) : 0;
    await rm(path, { force: true });
    this.release(freed);
  }

  async removeTree(segments: string[]): Promise<void> {
    const path = this.pathFor(segments);
    const freed = this.quotaLimited ? await walkTree(path) : 0;
    await rm(path, { recursive: true, force: true });
    this.release(freed);
  }

  /**
   * Holds a finished part until the caller's transaction, which records it, has committed:
   * `removingOnFailure` then moves it into place (or discards it on a rollback).
   */
  deferCommit(writer: PartWriter): void {
    this.deferred.add(writer);
  }

  /** Commits (or discards) the deferred parts under `folders`. */
  async settleDeferred(folders: string[][], outcome: 'commit' | 'discard'): Promise<void> {
    const prefixes = folders.map((segments) => relative(this.root, this.pathFor(segments)) + sep);
    for (const writer of [...this.deferred]) {
      if (!prefixes.some((prefix) => writer.relPath.startsWith(prefix))) continue;
      this.deferred.delete(writer);
      await (outcome === 'commit' ? writer.commit() : writer.discard());
    }
  }

  /** Creates the folders of `path` (0700 each). */
  async mkdirs(path: string): Promise<void> {
    await mkdir(path, { recursive: true, mode: DIR_MODE });
  }

  /**
   * One pass over the parts: a part whose final path has a committed row with its size and SHA-256
   * is a rename a crash interrupted, and is moved into place; any other part older than `maxAgeMs`
   * is a killed upload, and is removed. Parts that a request is writing are left alone. When no
   * writer is open, the quota count is also corrected from a fresh walk.
   */
  async sweepParts(opts: {
    maxAgeMs: number;
    committed: (relPath: string) => Promise<{ sizeBytes: number; sha256: string } | undefined>;
  }): Promise<{ removed: number; recovered: number }> {
    const counts = { removed: 0, recovered: 0 };
    const partsRoot = join(this.root, PARTS_DIR);
    for (const path of await listFiles(partsRoot)) {
      const relPath = relative(partsRoot, path);
      if (this.writers.has(relPath)) continue;
      const info = await stat(path).catch(() => undefined);
      if (!info) continue;
      const row = await opts.committed(relPath);
      if (row && row.sizeBytes === info.size && row.sha256 === (await sha256File(path))) {
        await this.moveIntoPlace(path, this.absolute(relPath));
        counts.recovered += 1;
      } else if (Date.now() - info.mtimeMs > opts.maxAgeMs) {
        await rm(path, { force: true });
        this.release(info.size);
        counts.removed += 1;
      }
    }
    if (this.writers.size === 0) await pruneEmptyDirs(partsRoot);
    if (this.quotaLimited && this.writers.size === 0) {
      const total = await walkTree(this.root);
      if (this.writers.size === 0) this.usedBytes = total;
    }
    return counts;
  }

  // ------------------------------------------------------------------ used by PartWriter

  /** @internal Renames a finished part over its final path (fsync'ed), accounting a replaced file. */
  async moveIntoPlace(part: string, target: string): Promise<void> {
    await this.mkdirs(dirname(target));
    const replaced = this.quotaLimited ? await sizeOf(target) : 0;
    try {
      await rename(part, target);
    } catch (err) {
      // Another server process on this data dir (its sweeper) finished the move already.
      if (!isMissing(err) || !(await stat(target).catch(() => undefined))) throw err;
      return;
    }
    this.release(replaced);
    await fsyncDir(dirname(target));
  }

  /** @internal Counts `bytes` against the quota before they are written; 413 past it. */
  async reserve(bytes: number): Promise<void> {
    if (!this.quotaLimited) return;
    await this.ensureAccounted();
    if (this.usedBytes! + bytes > this.quotaBytes) throw quotaUsedUp();
    this.usedBytes! += bytes;
  }

  /** @internal Gives back bytes removed from disk. */
  release(bytes: number): void {
    if (this.usedBytes !== undefined) this.usedBytes = Math.max(0, this.usedBytes - bytes);
  }

  /** @internal 413 when the disk itself is (nearly) full. */
  async checkFreeDisk(): Promise<void> {
    await mkdir(this.root, { recursive: true, mode: DIR_MODE });
    const fs = await statfs(this.root);
    if (fs.bavail * fs.bsize < MIN_FREE_BYTES) throw diskFull();
  }

  /** @internal */
  forget(writer: PartWriter): void {
    if (this.writers.get(writer.relPath) === writer) this.writers.delete(writer.relPath);
  }

  private get quotaLimited(): boolean {
    return Number.isFinite(this.quotaBytes);
  }

  private async ensureAccounted(): Promise<void> {
    if (!this.quotaLimited || this.usedBytes !== undefined) return;
    this.accounting ??= walkTree(this.root).then((total) => {
      this.usedBytes ??= total;
    });
    await this.accounting;
  }
}

/**
 * One unfinished file (`files/.uploads/<relPath>`), written in order. `finish()` makes it durable
 * (fsync) and `commit()` moves it into place; callers that record it in the database commit the
 * row between the two, so a row never names a file that is not whole. `keep()` closes it for a
 * later request to resume; `discard()` removes it.
 */
export class PartWriter {
  /** Bytes in the part so far. */
  size = 0;
  readonly closed: Promise<void>;
  private markClosed!: () => void;
  private handle: FileHandle | undefined;
  private readonly hash: Hash = createHash('sha256');
  private sinceDiskCheck = 0;
  private finished = false;
  private discarded = false;
  private readonly takeover = new AbortController();

  constructor(
    private readonly storage: LocalStorage,
    /** The final path, relative to the storage root. */
    readonly relPath: string,
  ) {
    this.closed = new Promise((resolve) => {
      this.markClosed = resolve;
    });
  }

  get partPath(): string {
    return this.storage.partPath(this.relPath);
  }

  /** Aborted when a newer request for the same file takes over: stop reading the old body. */
  get superseded(): AbortSignal {
    return this.takeover.signal;
  }

  /** @internal Asks the writer to stop; a writer already finishing its file completes. */
  supersede(): void {
    if (!this.finished)
      this.takeover.abort(
        new ApiError(409, 'upload_superseded', 'A newer request for this file took over the upload.'),
      );
  }

  /** @internal Opens (offset 0: truncates) the part; see `LocalStorage.openPart`. */
  async open(offset: number): Promise<void> {
    await this.storage.mkdirs(dirname(this.partPath));
    const existing = await sizeOf(this.partPath);
    if (offset === 0) {
      // the sweeper may prune the (empty) folder between the mkdir and the open: make it again
      this.handle = await open(this.partPath, 'w', FILE_MODE).catch(async (err) => {
        if (!isMissing(err)) throw err;
        await this.storage.mkdirs(dirname(this.partPath));
        return open(this.partPath, 'w', FILE_MODE);
      });
      this.storage.release(existing);
      return;
    }
    if (existing !== offset) {
      throw new ApiError(
        409,
        'upload_offset_mismatch',
        `The server holds ${existing} bytes of this file, not ${offset}; resume from ${existing}.`,
        'Content-Range',
      );
    }
    // The digest covers the whole file: read back what earlier requests stored.
    for await (const chunk of createReadStream(this.partPath)) this.hash.update(chunk as Buffer);
    this.handle = await open(this.partPath, 'a', FILE_MODE);
    this.size = offset;
  }

  /** Appends `chunk`, after the size limit, the quota and (every 16 MiB) the free disk allow it. */
  async write(chunk: Buffer): Promise<void> {
    this.takeover.signal.throwIfAborted();
    if (!this.handle || this.finished) throw new Error(`write after close (${this.relPath})`);
    const limit = this.storage.maxUploadBytes;
    if (this.size + chunk.length > limit) throw tooLarge(limit);
    this.sinceDiskCheck += chunk.length;
    if (this.sinceDiskCheck >= DISK_CHECK_BYTES) {
      this.sinceDiskCheck = 0;
      await this.storage.checkFreeDisk();
    }
    await this.storage.reserve(chunk.length);
    for (let done = 0; done < chunk.length; ) {
      done += (await this.handle.write(chunk, done, chunk.length - done)).bytesWritten;
    }
    this.hash.update(chunk);
    this.size += chunk.length;
    this.storage.bytesReceived += chunk.length;
  }

  /** Flushes the part to disk and closes it; the file's size and SHA-256. */
  async finish(): Promise<StoredObject> {
    if (!this.handle || this.finished) throw new Error(`finish after close (${this.relPath})`);
    this.finished = true;
    await this.handle.sync();
    await this.handle.close();
    this.handle = undefined;
    return { relPath: this.relPath, sizeBytes: this.size, sha256: this.hash.digest('hex') };
  }

  /** Moves the finished part to its final path (replacing a file of that name). */
  async commit(): Promise<void> {
    try {
      await this.storage.moveIntoPlace(this.partPath, this.storage.absolute(this.relPath));
    } finally {
      this.close();
    }
  }

  /** Closes the part and leaves it on disk, for a later request to resume (or the sweeper). */
  async keep(): Promise<void> {
    await this.handle?.close().catch(() => {});
    this.handle = undefined;
    this.close();
  }

  /** True once `discard` has begun: the part can no longer be committed. */
  get isDiscarded(): boolean {
    return this.discarded;
  }

  /** Removes the part (an upload refused or rolled back). */
  async discard(): Promise<void> {
    this.discarded = true;
    await this.handle?.close().catch(() => {});
    this.handle = undefined;
    const size = await sizeOf(this.partPath).catch(() => 0);
    await rm(this.partPath, { force: true });
    this.storage.release(size);
    this.close();
  }

  private close(): void {
    this.storage.forget(this);
    this.markClosed();
  }
}

/**
 * Runs `work`, which writes files and records them in a transaction. Once it has committed, the
 * files it deferred (`deferCommit`) under `folders` move into place; if it fails, they and the
 * folders are removed before rethrowing. A rollback takes the rows but never the bytes, so without
 * this a failed create would leave files nothing refers to.
 */
export async function removingOnFailure<T>(
  storage: LocalStorage,
  folders: string[][],
  work: () => Promise<T>,
): Promise<T> {
  let result: T;
  try {
    result = await work();
  } catch (err) {
    await storage.settleDeferred(folders, 'discard').catch(() => {});
    for (const folder of folders) await storage.removeTree(folder).catch(() => {});
    throw err;
  }
  await storage.settleDeferred(folders, 'commit');
  return result;
}

/**
 * Bytes under `dir` (0 when it does not exist), calling `visit` on each entry. Uploads rename and
 * remove files while this walks: an entry gone by the time it is read counts as 0 bytes.
 */
async function walkTree(
  dir: string,
  visit?: (path: string, isDir: boolean) => Promise<void>,
): Promise<number> {
  const ifGone =
    <T>(fallback: T) =>
    (err: unknown): T => {
      if (isMissing(err)) return fallback;
      throw err;
    };
  let total = 0;
  for (const entry of await readdir(dir, { withFileTypes: true }).catch(ifGone([]))) {
    const full = join(dir, entry.name);
    await visit?.(full, entry.isDirectory());
    total += entry.isDirectory()
      ? await walkTree(full, visit)
      : await stat(full).then((s) => s.size, ifGone(0));
  }
  return total;
}

/** Every file under `dir`. */
async function listFiles(dir: string): Promise<string[]> {
  const files: string[] = [];
  const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
  for (const entry of entries) {
    const full = join(dir, entry.name);
    if (entry.isDirectory()) files.push(...(await listFiles(full)));
    else files.push(full);
  }
  return files;
}

/** Removes the empty folders under `dir` (left by swept or finished parts), keeping `dir`. */
async function pruneEmptyDirs(dir: string): Promise<void> {
  const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
  for (const entry of entries) {
    if (!entry.isDirectory()) continue;
    const full = join(dir, entry.name);
    await pruneEmptyDirs(full);
    // fails harmlessly when a file is in it (or a writer just created one)
    await rmdir(full).catch(() => {});
  }
}

async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** Makes a rename durable: the directory entry itself must reach the disk. */
async function fsyncDir(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
