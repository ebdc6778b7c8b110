// The SDK's bundle in a real browser (headless Chromium), not a Node process with stubbed globals:
// it loads as an ES module without Node's built-ins, refuses to hold a key in a page unless told
// to, and with `dangerouslyAllowBrowser` calls the API without the headers a page must not set.
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, expect, it } from 'vitest';

const run = promisify(execFile);
const CHROMIUM = ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => existsSync(p));
const dist = fileURLToPath(new URL('../../dist/', import.meta.url));

// The page: the bundle as a module, then what it did, as JSON in the body (read by --dump-dom).
const PAGE = `<!doctype html><html><body>pending<script type="module">
import { Tunery } from '/sdk/index.js';
const out = {};
try { new Tunery({ apiKey: 'tk_page', baseURL: location.origin }); out.refused = null; }
catch (err) { out.refused = err.message; }
const tunery = new Tunery({ apiKey: 'tk_page', baseURL: location.origin, dangerouslyAllowBrowser: true });
try { out.budget = await tunery.budget.get(); } catch (err) { out.error = String(err); }
document.body.textContent = JSON.stringify(out);
</script></body></html>`;

const BUDGET = { tenant_id: 'default', limit_usd: null, spent_usd: 0, reserved_usd: 0, remaining_usd: null };

let server: Server;
let url: string;
let profile: string;
const apiRequests: { method: string; headers: IncomingHttpHeaders }[] = [];

beforeAll(async () => {
  profile = await mkdtemp(join(tmpdir(), 'tunery-sdk-chromium-'));
  server = createServer(async (req, res) => {
    if (req.url === '/') {
      res.writeHead(200, { 'content-type': 'text/html' }).end(PAGE);
    } else if (req.url?.startsWith('/sdk/') && !req.url.includes('..')) {
      const body = await readFile(join(dist, req.url.slice('/sdk/'.length))).catch(() => null);
      if (body) res.writeHead(200, { 'content-type': 'text/javascript' }).end(body);
      else res.writeHead(404).end();
    } else if (req.url === '/v1/budget') {
      apiRequests.push({ method: req.method ?? '', headers: req.headers });
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(BUDGET));
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/`;
});

afterAll(async () => {
  await new Promise((resolve) => server?.close(resolve));
  await rm(profile, { recursive: true, force: true });
});

it.skipIf(!CHROMIUM)(
  'in a page: refused without dangerouslyAllowBrowser, then calls the API with its key',
  async () => {
    expect(existsSync(join(dist, 'index.js')), 'run `pnpm -C packages/sdk build` first').toBe(true);
    const flags = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run'];
    const quiet = ['--disable-background-networking', '--disable-component-update', '--disable-sync'];
    const { stdout } = await run(
      CHROMIUM!,
      [...flags, ...quiet, '--virtual-time-budget=10000', `--user-data-dir=${profile}`, '--dump-dom', url],
      { timeout: 90_000 },
    );
    const text = /<body>(.*)<\/body>/s.exec(stdout)?.[1] ?? stdout;
    const out = JSON.parse(text);
    expect(out.refused).toMatch(/dangerouslyAllowBrowser/);
    expect(out).toMatchObject({ budget: BUDGET });
    expect(apiRequests.map((r) => r.method)).toEqual(['GET']);
    const headers = apiRequests[0]!.headers;
    expect(headers.authorization).toBe('Bearer tk_page');
    // the browser's own User-Agent, not the SDK's (a page setting it would need a CORS preflight)
    expect(headers['user-agent']).toMatch(/HeadlessChrome|Chrome/);
    expect(headers['user-agent']).not.toMatch(/tunery-sdk-js/);
    expect(headers['x-tunery-retry-count']).toBe('0');
  },
  120_000,
);
