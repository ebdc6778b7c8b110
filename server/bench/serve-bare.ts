/**
 * The peer of the server benchmark: a bare Express app in its own process, answering
 * `GET /v1/training/jobs/:job_id` with the JSON body Tunery gave for the same job (read from
 * `--body FILE`) — no auth, no validation, no database. Prints `READY {url}` and serves until SIGTERM,
 * SIGINT or the end of its stdin.
 */
import { readFile } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { parseArgs } from 'node:util';
import express from 'express';
import { stopWithParent } from './stop-with-parent.js';

export interface BareInfo {
  url: string;
}

const { values } = parseArgs({ options: { body: { type: 'string' } } });
if (!values.body) throw new Error('serve-bare.ts needs --body FILE');
const body: unknown = JSON.parse(await readFile(values.body, 'utf8'));

const app = express();
app.disable('x-powered-by');
app.use(express.json());
app.get('/v1/training/jobs/:job_id', (_req, res) => {
  res.json(body);
});

const server = app.listen(0, '127.0.0.1', () => {
  const { port } = server.address() as AddressInfo;
  process.stdout.write(`READY ${JSON.stringify({ url: `http://127.0.0.1:${port}` } satisfies BareInfo)}\n`);
});
const stop = () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
};
stopWithParent(stop);
