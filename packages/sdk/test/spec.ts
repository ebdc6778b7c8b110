// The OpenAPI document, dereferenced, with lookups from a request to its operation.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parse } from 'yaml';

export const SPEC_PATH = fileURLToPath(new URL('../../../openapi/openapi.yaml', import.meta.url));

type Json = Record<string, unknown>;

export interface SpecOperation {
  operationId: string;
  method: string;
  path: string;
  operation: Json;
  pattern: RegExp;
}

export function loadSpec(): Json {
  return parse(readFileSync(SPEC_PATH, 'utf8')) as Json;
}

/** Replaces every local `$ref` with what it points at (the spec has no cycles). */
export function dereference<T>(doc: T): T {
  const root = doc as Json;
  const resolve = (ref: string): unknown =>
    ref
      .replace(/^#\//, '')
      .split('/')
      .reduce<unknown>((node, key) => (node as Json)[key.replace(/~1/g, '/').replace(/~0/g, '~')], root);
  const walk = (node: unknown, depth: number): unknown => {
    if (depth > 64) throw new Error('$ref cycle');
    if (Array.isArray(node)) return node.map((n) => walk(n, depth + 1));
    if (node && typeof node === 'object') {
      const ref = (node as Json).$ref;
      if (typeof ref === 'string') {
        const { $ref: _ref, ...siblings } = node as Json;
        return { ...(walk(resolve(ref), depth + 1) as Json), ...(walk(siblings, depth + 1) as Json) };
      }
      return Object.fromEntries(Object.entries(node).map(([k, v]) => [k, walk(v, depth + 1)]));
    }
    return node;
  };
  return walk(doc, 0) as T;
}

/**
 * Tunery's operations, which the SDK and its mock cover. The OpenAI-compatible surface (tag
 * `OpenAI`, under `/openai/v1`) is for OpenAI's own clients; server and e2e tests cover it.
 */
export function operationsOf(doc: Json): SpecOperation[] {
  const result: SpecOperation[] = [];
  for (const [path, item] of Object.entries(doc.paths as Json)) {
    for (const [method, operation] of Object.entries(item as Json)) {
      if (!['get', 'post', 'put', 'delete', 'patch'].includes(method)) continue;
      if (((operation as Json).tags as string[] | undefined)?.includes('OpenAI')) continue;
      const pattern = new RegExp(`^${path.replace(/\{[^}]+\}/g, '[^/]+')}$`);
      result.push({
        operationId: (operation as Json).operationId as string,
        method,
        path,
        operation: operation as Json,
        pattern,
      });
    }
  }
  return result;
}

export function findOperation(ops: SpecOperation[], method: string, url: string): SpecOperation | undefined {
  const { pathname } = new URL(url);
  const params = (op: SpecOperation) => op.path.split('{').length;
  // A literal segment beats a parameter: `/v1/datasets/build` is not dataset "build".
  return ops
    .filter((op) => op.method === method.toLowerCase() && op.pattern.test(pathname))
    .sort((a, b) => params(a) - params(b))[0];
}
