import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    // Each test file starts real servers and databases: separate processes keep them apart.
    pool: 'forks',
    // The CI machine has two cores; more files at once only makes every one slower.
    maxWorkers: 2,
    fileParallelism: true,
    testTimeout: 30_000,
    hookTimeout: 60_000,
  },
});
