// The built package, loaded the way users load it: plain Node, ESM and CommonJS, by package name.
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const run = promisify(execFile);
const packageDir = fileURLToPath(new URL('../..', import.meta.url));
let dir: string;
/** The mock answers every operation of the spec, one handler each. */
let operations: number;

const script = (load: (specifier: string) => string) => `
const { Tunery, Distiller, Trainer, APIError, InsufficientCreditsError } = ${load('@tunery/sdk')};
const { createTuneryMock } = ${load('@tunery/sdk/mocks')};
const http = ${load('node:http')};
const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ version: 'v', api_version: req.headers.authorization }));
});
server.listen(0, '127.0.0.1', async () => {
const baseURL = 'http://127.0.0.1:' + server.address().port;
const tunery = new Tunery({ baseURL, apiKey: 'tk' });
const distiller = new Distiller({ baseURL });
const trainer = new Trainer({ baseURL });
const mock = createTuneryMock();
const version = await tunery.version();
server.close();
console.log(JSON.stringify({
  version,
  jobs: typeof tunery.training.jobs.createAndWait,
  distiller: typeof distiller.createAndWait,
  trainer: typeof trainer.jobs.followLogs,
  errors: new InsufficientCreditsError(402, undefined, 'x', new Headers()) instanceof APIError,
  handlers: mock.handlers.length,
}));
});
`;

beforeAll(async () => {
  if (!existsSync(join(packageDir, 'dist/index.js')))
    throw new Error('dist/ is missing: run `pnpm build` first.');
  // Inside the package directory, so that Node resolves `@tunery/sdk` to this package (self-reference).
  dir = await mkdtemp(join(packageDir, '.exports-test-'));
  const spec = await readFile(join(packageDir, '../../openapi/openapi.yaml'), 'utf8');
  operations = spec.match(/^\s+operationId: /gm)?.length ?? 0;
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('the built package', () => {
  it.each([
    ['ESM', 'check.mjs', (s: string) => `await import('${s}')`],
    ['CommonJS', 'check.cjs', (s: string) => `require('${s}')`],
  ])('loads from %s and constructs the clients', async (_kind, file, load) => {
    const path = join(dir, file);
    await writeFile(path, script(load));
    const { stdout } = await run(process.execPath, [path], { cwd: dir });
    expect(JSON.parse(stdout)).toEqual({
      version: { version: 'v', api_version: 'Bearer tk' },
      jobs: 'function',
      distiller: 'function',
      trainer: 'function',
      errors: true,
      handlers: operations,
    });
  });
});
