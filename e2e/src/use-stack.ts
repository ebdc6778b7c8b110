// One live stack per test file: started in beforeAll, stopped in afterAll (even after a failure),
// and its workers' output printed when a test fails.
import { dirname } from 'node:path';
import { afterAll, beforeAll, beforeEach, inject } from 'vitest';
import { type Stack, type StackOptions, startStack } from './stack.js';

export interface UseStackOptions extends StackOptions {
  /** CPU workers to start with the server (default 1). */
  workers?: number;
}

/** The tiny model's catalog name in every stack. */
export const TINY = 'tiny-llama';

export function useStack(opts: UseStackOptions): () => Stack {
  let stack: Stack | undefined;
  beforeAll(async () => {
    // The tiny model's folder is the one place server and workers accept model paths from.
    stack = await startStack({ modelRoots: dirname(inject('tinyModel')), ...opts });
    try {
      for (let i = 0; i < (opts.workers ?? 1); i++) stack.startWorker();
      await stack.registerModel(TINY, inject('tinyModel'));
    } catch (err) {
      console.error(stack.report());
      throw err;
    }
  });
  beforeEach(({ onTestFailed }) => {
    onTestFailed(() => {
      if (stack) console.error(`\n===== ${opts.name}: worker and server output =====\n${stack.report()}`);
    });
  });
  afterAll(async () => {
    await stack?.stop();
  });
  return () => {
    if (!stack) throw new Error(`the ${opts.name} stack did not start`);
    return stack;
  };
}
