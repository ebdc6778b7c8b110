/**
 * The README's self-hosting steps, as a user runs them: `tunery-server start` on the embedded
 * database, then `tunery-server keys …` in another terminal while it runs.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { chmod, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { restrictToOwner } from '../src/db.js';
import { DatabaseLocked, lockDatabaseDir } from '../src/db-lock.js';

const serverDir = fileURLToPath(new URL('..', import.meta.url));
/** node with tsx's loader, not the tsx wrapper: the pid is the server's own. */
const node = [process.execPath, '--import', 'tsx', 'src/cli.ts'] as const;
const cliEnv = (dataDir: string) => ({
  ...process.env,
  TUNERY_DATA_DIR: dataDir,
  PORT: '0',
  LOG_LEVEL: 'warn',
  DATABASE_URL: '',
  TUNERY_ADMIN_KEY: '',
  TUNERY_SECRETS_KEY: '',
});

/** Runs one CLI command to its end. */
function cli(dataDir: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      node[0],
      [...node.slice(1), ...args],
      { cwd: serverDir, env: cliEnv(dataDir) },
      (err, stdout, stderr) =>
        resolve({ code: err ? Number((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

/**
 * `tunery-server start` (from the TypeScript sources, or `command`: the compiled `dist/cli.js`);
 * resolves once it says it listens (with the admin key it printed, if any), or rejects if it exits.
 */
function startCli(
  dataDir: string,
  command: readonly string[] = node,
): Promise<{ child: ChildProcess; adminKey: string | undefined }> {
  const child = spawn(command[0]!, [...command.slice(1), 'start'], { cwd: serverDir, env: cliEnv(dataDir) });
  let stdout = '';
  let stderr = '';
  child.stderr!.on('data', (chunk) => {
    stderr += chunk;
  });
  return new Promise((resolve, reject) => {
    child.stdout!.on('data', (chunk) => {
      stdout += chunk;
      if (stdout.includes('tunery-server listening on')) {
        resolve({ child, adminKey: /Admin API key[^\n]*\n(tk_\S+)\n/.exec(stdout)?.[1] });
      }
    });
    child.once('exit', (code) => reject(new Error(`start exited ${code}: ${stderr}`)));
  });
}

const stopCli = (child: ChildProcess) =>
  new Promise<number | null>((resolve) => {
    if (child.exitCode !== null) return resolve(child.exitCode);
    child.once('exit', (code) => resolve(code));
    child.kill('SIGTERM');
  });

const lastLine = (text: string) => text.trim().split('\n').at(-1)!;
const modeOf = async (path: string) => (await stat(path)).mode & 0o777;

// Each step starts node processes that open PGlite: seconds each on a busy machine.
describe('tunery-server CLI on the embedded database', { timeout: 180_000 }, () => {
  let dataDir: string;
  let server: ChildProcess | undefined;
  beforeAll(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'tunery-cli-'));
  });
  afterAll(async () => {
    if (server) await stopCli(server);
    await rm(dataDir, { recursive: true, force: true });
  });

  const serverUrl = async () =>
    JSON.parse(await readFile(join(dataDir, 'server.json'), 'utf8')).url as string;
  const call = async (key: string, path = '/v1/training/jobs') =>
    fetch(`${await serverUrl()}${path}`, { headers: { authorization: `Bearer ${key}` } });

  it('creates, lists and revokes keys through the running server; they work at once', async () => {
    const started = await startCli(dataDir);
    server = started.child;
    expect(started.adminKey).toMatch(/^tk_/);

    const created = await cli(dataDir, ['keys', 'create', '--tenant', 'acme', '--name', 'laptop']);
    expect(created.code).toBe(0);
    expect(created.stderr).toContain('via the server at');
    const key = lastLine(created.stdout);
    expect(key).toMatch(/^tk_/);
    expect((await call(key)).status).toBe(200);

    const listed = await cli(dataDir, ['keys', 'list']);
    expect(listed.code).toBe(0);
    expect(listed.stdout).toContain('laptop');
    expect(listed.stdout).toContain(key.slice(0, 7));
    expect(listed.stdout).not.toContain(key);
    const id = /^(key_\S+)\s+user\s+acme/m.exec(listed.stdout)![1]!;

    const revoked = await cli(dataDir, ['keys', 'revoke', id]);
    expect(revoked.code).toBe(0);
    const refused = await call(key);
    expect(refused.status).toBe(401);
    expect((await refused.json()).error.code).toBe('api_key_revoked');

    const expiring = await cli(dataDir, ['keys', 'create', '--worker', '--expires-in', '1d']);
    expect(expiring.code).toBe(0);
    expect(expiring.stderr).toMatch(/expires 20\d\d-/);
    expect((await cli(dataDir, ['keys', 'create', '--worker', '--expires-in', 'soon'])).code).toBe(2);
    // the API refuses expiries past the year 9999; the database path must too
    expect((await cli(dataDir, ['keys', 'create', '--worker', '--expires-in', '3000000d'])).code).toBe(2);
  });

  it('refuses a second server on the same directory with a clear message', async () => {
    const second = await cli(dataDir, ['start']);
    expect(second.code).not.toBe(0);
    expect(second.stderr).toContain(`in use by process ${server!.pid}`);
    // the first one is unharmed
    expect((await call(lastLine((await readFile(join(dataDir, 'admin-key'), 'utf8')).trim()))).status).toBe(
      200,
    );
  });

  it('keeps the data dir and the database files to their owner (0700 folders, 0600 files)', async () => {
    expect(await modeOf(dataDir)).toBe(0o700);
    for (const file of ['admin-key', 'secrets-key', 'db.lock', 'server.json']) {
      expect([file, await modeOf(join(dataDir, file))]).toEqual([file, 0o600]);
    }
    const entries = await readdir(join(dataDir, 'db'), { withFileTypes: true, recursive: true });
    expect(entries.length).toBeGreaterThan(10);
    for (const entry of entries) {
      const path = join(entry.parentPath, entry.name);
      const want = entry.isDirectory() ? 0o700 : 0o600;
      expect([path, await modeOf(path)]).toEqual([path, want]);
    }
  });

  it('writes keys straight to the database when no server runs, and they survive a restart', async () => {
    expect(await stopCli(server!)).toBe(0);
    server = undefined;
    await expect(stat(join(dataDir, 'db.lock'))).rejects.toThrow(/ENOENT/);
    const created = await cli(dataDir, ['keys', 'create', '--tenant', 'beta']);
    expect(created.code).toBe(0);
    expect(created.stderr).toContain('via the database');
    const key = lastLine(created.stdout);

    const restarted = await startCli(dataDir);
    server = restarted.child;
    expect(restarted.adminKey).toBeUndefined();
    expect((await call(key)).status).toBe(200);
  });
});

describe('the embedded database lock', () => {
  it('refuses a live owner and takes over a dead one', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tunery-lock-'));
    try {
      const lockFile = join(dir, 'db.lock');
      // a process that has exited: its pid is free
      const gone = spawn(process.execPath, ['-e', '']);
      await new Promise((resolve) => gone.once('exit', resolve));
      await writeFile(lockFile, `${gone.pid}\n`);
      const release = lockDatabaseDir(lockFile, dir);
      expect((await readFile(lockFile, 'utf8')).trim()).toBe(String(process.pid));
      release();
      await expect(stat(lockFile)).rejects.toThrow(/ENOENT/);

      await writeFile(lockFile, `${process.ppid}\n`); // alive: the test runner's parent
      expect(() => lockDatabaseDir(lockFile, dir)).toThrow(DatabaseLocked);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('restricts files an older server left world-readable', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tunery-perms-'));
    try {
      await writeFile(join(dir, 'PG_VERSION'), '17\n');
      await chmod(join(dir, 'PG_VERSION'), 0o666);
      await chmod(dir, 0o777);
      await restrictToOwner(dir);
      expect(await modeOf(dir)).toBe(0o700);
      expect(await modeOf(join(dir, 'PG_VERSION'))).toBe(0o600);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('the compiled server (pnpm -C server build, node dist/cli.js)', { timeout: 120_000 }, () => {
  it('starts from dist/cli.js without tsx and serves the API', async () => {
    const dataDir = await mkdtemp(join(tmpdir(), 'tunery-dist-'));
    const { child, adminKey } = await startCli(dataDir, [process.execPath, 'dist/cli.js']);
    try {
      // A loader would show in the command line; the compiled one runs on plain node.
      expect(child.spawnargs).not.toContain('tsx');
      const url = JSON.parse(await readFile(join(dataDir, 'server.json'), 'utf8')).url as string;
      expect((await fetch(`${url}/v1/health`)).status).toBe(200);
      const jobs = await fetch(`${url}/v1/training/jobs`, {
        headers: { authorization: `Bearer ${adminKey}` },
      });
      expect(jobs.status).toBe(200);
      expect((await jobs.json()).jobs).toEqual([]);
    } finally {
      await stopCli(child);
      await rm(dataDir, { recursive: true, force: true });
    }
  });
});
