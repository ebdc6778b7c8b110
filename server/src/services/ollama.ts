/**
 * Importing a GGUF file into an Ollama server through its HTTP API:
 * `HEAD /api/blobs/sha256:<digest>` (already there?), `POST /api/blobs/sha256:<digest>` (upload the
 * bytes), then `POST /api/create {model, files: {<file name>: "sha256:<digest>"}, stream: false}`.
 * Only loopback URLs are accepted: the server must never be turned into a client of other hosts.
 * Redirects are not followed, and a failure says nothing about what answered (or did not).
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

/**
 * Every failure answers the same: which step failed, and why (refused, timed out, an error body),
 * would let a tenant map the server's loopback ports through this endpoint. The operator's log
 * gets the detail.
 */
function importFailed(ctx: Pick<AppContext, 'logger'>, detail: string): ApiError {
  ctx.logger.warn({ ollama: detail }, 'ollama import failed');
  return new ApiError(502, 'ollama_unreachable', 'Ollama did not complete the import.', 'ollama_url');
}

/** One request to Ollama; redirects are answers like any other, never followed. */
async function call(
  ctx: Pick<AppContext, 'logger'>,
  base: URL,
  path: string,
  init: RequestInit & { timeoutMs: number },
): Promise<Response> {
  const { timeoutMs, ...rest } = init;
  try {
    return await fetch(new URL(path, base), {
      ...rest,
      redirect: 'manual',
      signal: AbortSignal.timeout(timeoutMs),
    });
  } catch (err) {
    const cause = (err as { cause?: { code?: string } }).cause?.code;
    throw importFailed(ctx, `${path}: ${cause ?? (err as Error).message}`);
  }
}

/**
 * The name a tenant's model gets in Ollama: in the tenant's own namespace, so no tenant can
 * overwrite another's model (or one the operator pulled). Tenant ids (`TenantId` in the spec) hold
 * letters, digits, `_` and `-`, as Ollama namespaces do; model names cannot hold `/`.
 */
export const ollamaModelName = (tenantId: string, name: string) => `tunery-${tenantId}/${name}`;

/** Uploads the GGUF (unless Ollama already has the blob) and creates the model `name` from it. */
export async function importGguf(
  ctx: Pick<AppContext, 'storage' | 'logger'>,
  base: URL,
  file: FileRow,
  name: string,
): Promise<void> {
  const digest = `sha256:${file.sha256}`;
  const blobPath = `/api/blobs/${digest}`;
  const probe = await call(ctx, base, blobPath, { method: 'HEAD', timeoutMs: PROBE_TIMEOUT_MS });
  if (probe.status !== 200) {
    const body = Readable.toWeb(ctx.storage.read(file.rel_path)) as ReadableStream<Uint8Array>;
    const upload = await call(ctx, base, blobPath, {
      method: 'POST',
      body,
      headers: { 'content-type': 'application/octet-stream', 'content-length': String(file.size_bytes) },
      duplex: 'half',
      timeoutMs: UPLOAD_TIMEOUT_MS,
    } as RequestInit & { timeoutMs: number });
    if (!upload.ok) throw importFailed(ctx, `blob upload answered ${upload.status}`);
  }
  const create = await call(ctx, base, '/api/create', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: name, files: { [file.name]: digest }, stream: false }),
    timeoutMs: CREATE_TIMEOUT_MS,
  });
  if (!create.ok) throw importFailed(ctx, `create answered ${create.status}`);
  const outcome = (await create.json().catch(() => ({}))) as { status?: string; error?: string };
  if (outcome.error) throw importFailed(ctx, `create failed: ${outcome.error}`);
}
