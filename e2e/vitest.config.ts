import { defineConfig } from 'vitest/config';

// Live tests: a real server and real workers per file. Files run one at a time, so that the CPU
// workers of one file do not slow the others' training down on a small machine.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['src/global-setup.ts'],
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 120_000,
    teardownTimeout: 30_000,
  },
});
