/**
 * Once per drill run: the tiny model the workers train (`tunery-worker make-tiny-model`, random
 * weights, nothing downloaded) and a template data dir whose PGlite database is migrated and holds
 * a worker token. Each drill's server starts on a copy of the template: no second PGlite init, and
 * no keys process racing the server for the database.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestProject } from 'vitest/node';
import { ROOT, SERVER_CLI, WORKER_BIN } from './harness-paths.js';

declare module 'vitest' {
  export interface ProvidedContext {
    /** Temp root of this run; every drill's server and workers live under it. */
    drillRoot: string;
    /** Directory of the tiny model (a `from_pretrained` path). */
    tinyModel: string;
    /** Migrated data dir to copy for each server. */
    templateDataDir: string;
    /** Worker token stored in the template's database. */
    workerToken: string;
  }
}

function run(command: string, args: string[], env: Record<string, string> = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const proc = spawn(command, args, {
      cwd: ROOT,
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    proc.stdout.on('data', (chunk: Buffer) => {
      out += chunk;
    });
    proc.stderr.on('data', (chunk: Buffer) => {
      err += chunk;
    });
    proc.once('error', reject);
    proc.once('exit', (code) =>
      code === 0
        ? resolve(out)
        : reject(new Error(`${command} ${args.join(' ')} exited ${code}:\n${err.slice(-4000)}`)),
    );
  });
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const root = await mkdtemp(join(tmpdir(), 'tunery-drills-'));
  // In a folder of its own: that folder is the drills' model root (TUNERY_MODEL_ROOTS), which must
  // not hold the servers' data dirs or the workers' workdirs.
  const tinyModel = join(root, 'models', 'tiny-model');
  const templateDataDir = join(root, 'template-data');
  const [, keyOutput] = await Promise.all([
    run(WORKER_BIN, ['make-tiny-model', tinyModel]),
    run(process.execPath, ['--import', 'tsx', SERVER_CLI, 'keys', 'create', '--worker', '--name', 'drills'], {
      TUNERY_DATA_DIR: templateDataDir,
      DATABASE_URL: '',
      LOG_LEVEL: 'error',
    }),
  ]);
  const workerToken = keyOutput.trim().split('\n').at(-1) ?? '';
  if (!workerToken.startsWith('tw_')) throw new Error(`no worker token in: ${keyOutput}`);
  project.provide('drillRoot', root);
  project.provide('tinyModel', tinyModel);
  project.provide('templateDataDir', templateDataDir);
  project.provide('workerToken', workerToken);
  return async () => {
    if (!process.env.TUNERY_DRILLS_KEEP) await rm(root, { recursive: true, force: true });
  };
}
