import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    // Every drill runs a real server and real PyTorch workers: one file at a time on two cores.
    pool: 'forks',
    fileParallelism: false,
    // Makes the tiny model and a migrated data-dir template once for all drills.
    globalSetup: ['./src/global-setup.ts'],
    testTimeout: 180_000,
    hookTimeout: 120_000,
    // A drill is a story told in order; a retry would hide the flake it exists to find.
    retry: 0,
  },
});
