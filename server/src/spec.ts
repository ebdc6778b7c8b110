import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parse } from 'yaml';

export const specPath = fileURLToPath(new URL('../../openapi/openapi.yaml', import.meta.url));

export interface SpecOperation {
  operationId: string;
  method: 'get' | 'post' | 'put' | 'delete' | 'patch';
  /** The spec's path, e.g. `/v1/training/jobs/{job_id}`. */
  path: string;
  /** The same path in Express syntax, e.g. `/v1/training/jobs/:job_id`. */
  expressPath: string;
}

interface SpecDocument {
  info: { version: string };
  paths: Record<string, Record<string, { operationId?: string } | unknown>>;
  components: { schemas: { ErrorCode: { enum: string[] } } };
}

let cached: SpecDocument | undefined;
export function loadSpec(): SpecDocument {
  cached ??= parse(readFileSync(specPath, 'utf8')) as SpecDocument;
  return cached;
}

const METHODS = ['get', 'post', 'put', 'delete', 'patch'] as const;

/** Every operation of the spec: the server mounts exactly these routes. */
export function specOperations(): SpecOperation[] {
  const operations: SpecOperation[] = [];
  for (const [path, item] of Object.entries(loadSpec().paths)) {
    for (const method of METHODS) {
      const op = item[method] as { operationId?: string } | undefined;
      if (!op?.operationId) continue;
      operations.push({
        operationId: op.operationId,
        method,
        path,
        expressPath: path.replace(/\{(\w+)\}/g, ':$1'),
      });
    }
  }
  return operations;
}
