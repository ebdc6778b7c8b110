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

/**
 * The order routes are tried in, the spec validator's own: a static segment before a parameter at
 * the same place (`/v1/datasets/build` before `/v1/datasets/:dataset_id`), a longer path before its prefix.
 */
export function routeOrder(a: string, b: string): number {
  const left = a.replaceAll('/:', '/~');
  const right = b.replaceAll('/:', '/~');
  if (left.startsWith(right)) return -1;
  if (right.startsWith(left)) return 1;
  return left > right ? 1 : -1;
}

/** The spec's operations grouped by Express path, the paths in routeOrder. */
export function operationsByPath(): [string, SpecOperation[]][] {
  const byPath = new Map<string, SpecOperation[]>();
  for (const op of specOperations()) byPath.set(op.expressPath, [...(byPath.get(op.expressPath) ?? []), op]);
  return [...byPath].sort(([a], [b]) => routeOrder(a, b));
}
