import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root, the server CLI and the worker CLI (importable from the global setup too). */
export const ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const SERVER_CLI = join(ROOT, 'server/src/cli.ts');
export const WORKER_BIN = join(ROOT, '.venv/bin/tunery-worker');
