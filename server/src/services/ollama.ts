/**
 * Importing a GGUF file into an Ollama server through its HTTP API:
 * `HEAD /api/blobs/sha256:<digest>` (already there?), `POST /api/blobs/sha256:<digest>` (upload the
 * bytes), then `POST /api/create {model, files: {<file name>: "sha256:<digest>"}, stream: false}`.
 * Only loopback URLs are accepted: the server must never be turned into a client of other hosts.
 */
import { Readable } from 'node:stream';
import type { AppContext } from '../context.js';
import { ApiError, badRequest } from '../errors.js';
import type { FileRow } from './registry.js';

export const DEFAULT_OLLAMA_URL = 'http://127.0.0.1:11434';
const LOOPBACK_HOSTS = new Set(['localhost', '127.0.0.1', '[::1]', '::1']);
/** Ollama verifies the digest of the whole file; a large GGUF takes a while to stream. */
const UPLOAD_TIMEOUT_MS = 30 * 60 * 1000;
const CREATE_TIMEOUT_MS = 10 * 60 * 1000;
const PROBE_TIMEOUT_MS = 10 * 1000;

/** The Ollama base URL, refusing anything but http(s) on a loopback host (`400 invalid_request`). */
export function loopbackOllamaUrl(raw: string | undefined): URL {
  let url: URL;
  try {
    url = new URL(raw ?? DEFAULT_OLLAMA_URL);
  } catch {
    throw badRequest(`ollama_url "${raw}" is not a URL.`, 'ollama_url');
  }
  if (!['http:', 'https:'].includes(url.protocol) || !LOOPBACK_HOSTS.has(url.hostname)) {
    throw badRequest(
      'ollama_url must be an http(s) URL on a loopback host (localhost, 127.0.0.1 or ::1).',
      'ollama_url',
    );
  }
  if (url.username || url.password) throw badRequest('ollama_url may not carry credentials.', 'ollama_url');
  return url;
}

const unreachable = (base: URL, detail: string) =>
  new ApiError(502, 'ollama_unreachable', `Ollama at ${base.origin} did not answer: ${detail}`, 'ollama_url');

async function call(base: URL, path: string, init: RequestInit & { timeoutMs: number }): Promise<Response> {
  const { timeoutMs, ...rest } = init;
  try {
    return await fetch(new URL(path, base), { ...rest, signal: AbortSignal.timeout(timeoutMs) });
  } catch (err) {
    const cause = (err as { cause?: { code?: string } }).cause?.code;
    throw unreachable(base, cause ?? (err as Error).message);
  }
}

async function failure(base: URL, what: string, res: Response): Promise<ApiError> {
  const text = (await res.text().catch(() => '')).slice(0, 500);
  let detail = text;
  try {
    detail = (JSON.parse(text) as { error?: string }).error ?? text;
  } catch {}
  return unreachable(base, `${what} answered ${res.status}${detail ? ` (${detail})` : ''}`);
}

/** Uploads the GGUF (unless Ollama already has the blob) and creates the model `name` from it. */
export async function importGguf(
  ctx: Pick<AppContext, 'storage'>,
  base: URL,
  file: FileRow,
  name: string,
): Promise<void> {
  const digest = `sha256:${file.sha256}`;
  const blobPath = `/api/blobs/${digest}`;
  const probe = await call(base, blobPath, { method: 'HEAD', timeoutMs: PROBE_TIMEOUT_MS });
  if (probe.status !== 200) {
    const body = Readable.toWeb(ctx.storage.read(file.rel_path)) as ReadableStream<Uint8Array>;
    const upload = await call(base, blobPath, {
      method: 'POST',
      body,
      headers: { 'content-type': 'application/octet-stream', 'content-length': String(file.size_bytes) },
      duplex: 'half',
      timeoutMs: UPLOAD_TIMEOUT_MS,
    } as RequestInit & { timeoutMs: number });
    if (!upload.ok) throw await failure(base, 'the blob upload', upload);
  }
  const create = await call(base, '/api/create', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: name, files: { [file.name]: digest }, stream: false }),
    timeoutMs: CREATE_TIMEOUT_MS,
  });
  if (!create.ok) throw await failure(base, 'create', create);
  const outcome = (await create.json().catch(() => ({}))) as { status?: string; error?: string };
  if (outcome.error) throw unreachable(base, `create failed (${outcome.error})`);
}
