import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, statSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../src/config.js';
import { type RunningServer, startServer } from '../src/server.js';
import { specOperations } from '../src/spec.js';

const run = promisify(execFile);
const CHROMIUM = ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => existsSync(p));
const artifactsDir = resolve(import.meta.dirname, '../../artifacts');
// Flags that keep Chromium from reaching for the network on a closed machine.
const CHROMIUM_FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--virtual-time-budget=20000',
];

describe('docs served at /docs', () => {
  let server: RunningServer;
  let profile: string;
  beforeAll(async () => {
    profile = await mkdtemp(join(tmpdir(), 'tunery-chromium-'));
    const dataDir = await mkdtemp(join(tmpdir(), 'tunery-docs-'));
    server = await startServer(loadConfig({ port: 0, dataDir, databaseUrl: undefined }), {
      inMemory: true,
      quiet: true,
    });
  });
  afterAll(async () => {
    await server?.close();
    await rm(profile, { recursive: true, force: true });
  });

  it('serves the built reference (run `pnpm run docs` first)', async () => {
    const res = await fetch(`${server.url}/docs/api/`);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/html/);
    const landing = await fetch(`${server.url}/docs/`);
    expect(await landing.text()).toContain('SDK reference');
  });

  it.skipIf(!CHROMIUM)(
    'renders every operation in headless Chromium',
    async () => {
      const url = `${server.url}/docs/api/`;
      const { stdout } = await run(
        CHROMIUM!,
        [...CHROMIUM_FLAGS, `--user-data-dir=${profile}`, '--dump-dom', url],
        {
          maxBuffer: 64 * 1024 * 1024,
          timeout: 120_000,
        },
      );
      const summaries = [
        'Submit a training job',
        'Create a distillation job',
        'Claim the next job (long-poll)',
      ];
      for (const summary of summaries) expect(stdout).toContain(summary);
      // Each operation has an anchor with its operationId in the rendered page.
      const missing = specOperations().filter((op) => !stdout.includes(op.operationId));
      expect(missing.map((op) => op.operationId)).toEqual([]);
      expect(stdout).toContain('@tunery/sdk');

      mkdirSync(artifactsDir, { recursive: true });
      const shot = join(artifactsDir, 'docs-api.png');
      await run(
        CHROMIUM!,
        [
          ...CHROMIUM_FLAGS,
          `--user-data-dir=${profile}`,
          '--window-size=1400,1000',
          `--screenshot=${shot}`,
          url,
        ],
        { timeout: 120_000 },
      );
      expect(statSync(shot).size).toBeGreaterThan(10_000);
    },
    300_000,
  );

  it.skipIf(!CHROMIUM)(
    'shows the @tunery/sdk sample in the request panel of an operation',
    async () => {
      // Redoc 3 gives each operation a page of its own (a hash route); samples sit in its right panel.
      const url = `${server.url}/docs/api/#/training/createtrainingjob`;
      const { stdout } = await run(
        CHROMIUM!,
        [...CHROMIUM_FLAGS, `--user-data-dir=${profile}`, '--dump-dom', url],
        { maxBuffer: 64 * 1024 * 1024, timeout: 120_000 },
      );
      // The page's scripts hold the spec, samples included, so look only inside the rendered panel:
      // from the request samples panel's element to the response samples panel's.
      const start = stdout.search(/class="[^"]*\bpanel-request-samples\b/);
      expect(start, 'request samples panel').toBeGreaterThan(-1);
      const end = stdout.slice(start).search(/class="[^"]*\bpanel-response-samples\b/);
      const panel = stdout.slice(start, end === -1 ? undefined : start + end).replace(/<[^>]*>/g, '');
      expect(panel).toContain('@tunery/sdk');
      expect(panel).toContain('tunery.training.jobs.create(');
    },
    180_000,
  );
});
