import { closeSync, openSync, readFileSync, unlinkSync, writeSync } from 'node:fs';

/**
 * An exclusive lock on an embedded (PGlite) database directory: PGlite is one process's database,
 * and a second process opening the same files loses its writes (or the first one's). The lock is
 * a file created with O_EXCL holding the owner's pid; a lock whose pid is gone (kill -9, a crash)
 * is stale and taken over.
 */
export class DatabaseLocked extends Error {
  constructor(
    readonly pid: number,
    dbDir: string,
  ) {
    super(
      `The embedded database in ${dbDir} is in use by process ${pid} (another tunery-server?). ` +
        'Stop that process first, or point both at one Postgres with DATABASE_URL. Key commands ' +
        '(tunery-server keys …) go through a running server by themselves.',
    );
  }
}

/** The live pid holding `lockFile`, or undefined when there is no lock or its owner is gone. */
export function lockOwner(lockFile: string): number | undefined {
  let pid: number;
  try {
    pid = Number.parseInt(readFileSync(lockFile, 'utf8'), 10);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  // Our own pid in a lock we have not taken yet is a previous life of this pid (a restarted container).
  if (!Number.isInteger(pid) || pid <= 0 || pid === process.pid) return undefined;
  return isAlive(pid) ? pid : undefined;
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: it exists, as another user's process
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Takes the lock or throws DatabaseLocked; the returned function releases it (idempotent). */
export function lockDatabaseDir(lockFile: string, dbDir: string): () => void {
  for (let tries = 0; ; tries++) {
    try {
      const fd = openSync(lockFile, 'wx', 0o600);
      writeSync(fd, `${process.pid}\n`);
      closeSync(fd);
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || tries >= 3) throw err;
      const owner = lockOwner(lockFile);
      if (owner !== undefined) throw new DatabaseLocked(owner, dbDir);
      unlinkQuietly(lockFile); // stale: its owner is gone
    }
  }
  const release = () => {
    process.off('exit', release);
    // only our own lock: never one a later process took over
    if (readPid(lockFile) === process.pid) unlinkQuietly(lockFile);
  };
  process.on('exit', release);
  return release;
}

function readPid(file: string): number | undefined {
  try {
    return Number.parseInt(readFileSync(file, 'utf8'), 10);
  } catch {
    return undefined;
  }
}

function unlinkQuietly(file: string): void {
  try {
    unlinkSync(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
}
