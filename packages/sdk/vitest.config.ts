import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 20_000,
    // The machine is small and shared; a few files at a time is plenty.
    maxWorkers: 2,
  },
});
