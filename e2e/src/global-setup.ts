// Once per run: a tiny random-weight Llama (and its tokenizer) in a temp dir, shared by every file.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestProject } from 'vitest/node';
import { runToEnd, WORKER_BIN } from './stack.js';

declare module 'vitest' {
  export interface ProvidedContext {
    /** Absolute path of the tiny Llama made for this run. */
    tinyModel: string;
  }
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const dir = await mkdtemp(join(tmpdir(), 'tunery-e2e-models-'));
  const model = join(dir, 'tiny-llama');
  await runToEnd(WORKER_BIN, ['make-tiny-model', model, '--arch', 'llama']);
  project.provide('tinyModel', model);
  return () => rm(dir, { recursive: true, force: true });
}
