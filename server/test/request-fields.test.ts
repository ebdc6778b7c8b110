/**
 * No request field is accepted and ignored: every property a request of the spec may carry (request
 * bodies, recursively through $ref, and query parameters) must be read somewhere: by the server's
 * own code, or by the worker for config fields the server passes through to it. A field that is
 * purely descriptive is listed in ALLOWED with the reason it is fine to only store or echo it.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadSpec } from '../src/spec.js';

const root = resolve(import.meta.dirname, '../..');

function filesUnder(dir: string, ext: string, skip: (path: string) => boolean): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    if (skip(path)) continue;
    if (statSync(path).isDirectory()) out.push(...filesUnder(path, ext, skip));
    else if (name.endsWith(ext)) out.push(path);
  }
  return out;
}

const serverText = filesUnder(join(root, 'server/src'), '.ts', (p) => p.includes(`${'/'}generated`))
  .map((f) => readFileSync(f, 'utf8'))
  .join('\n');
const workerText = filesUnder(join(root, 'workers/tunery_worker'), '.py', (p) => p.includes('__pycache__'))
  .map((f) => readFileSync(f, 'utf8'))
  .join('\n');

/** Fields no code needs to act on, each with why storing or echoing it is all it asks for. */
const ALLOWED: Record<string, string> = {
  task_type:
    'LoraConfig.task_type has the single value CAUSAL_LM (the validator refuses any other): the only task Tunery trains, so there is nothing to act on.',
  latency_ms:
    'LlmCall.latency_ms is a measurement the client recorded; it is stored with the trajectory and returned by getTrajectory as written.',
};

type Schema = {
  $ref?: string;
  type?: string | string[];
  properties?: Record<string, Schema>;
  items?: Schema;
  oneOf?: Schema[];
  anyOf?: Schema[];
  allOf?: Schema[];
  additionalProperties?: boolean | Schema;
};
type Parameter = { $ref?: string; name?: string; in?: string };
type Operation = {
  operationId?: string;
  parameters?: Parameter[];
  requestBody?: { content?: Record<string, { schema?: Schema }> };
};

const spec = loadSpec() as unknown as {
  paths: Record<string, Record<string, Operation | Parameter[]>>;
  components: { schemas: Record<string, Schema>; parameters: Record<string, Parameter> };
};

const deref = <T extends { $ref?: string }>(node: T): T => {
  if (!node.$ref) return node;
  const [, , section, name] = node.$ref.split('/');
  return deref((spec.components as unknown as Record<string, Record<string, T>>)[section!]![name!]!);
};

/** Every property name under a schema, as `Schema.path.to.name`. */
function walk(schema: Schema, where: string, out: Map<string, string>, seen: Set<Schema>) {
  const node = deref(schema);
  if (seen.has(node)) return;
  seen.add(node);
  const label = schema.$ref ? schema.$ref.split('/').pop()! : where;
  for (const [name, prop] of Object.entries(node.properties ?? {})) {
    out.set(`${label}.${name}`, name);
    walk(prop, `${label}.${name}`, out, seen);
  }
  if (node.items) walk(node.items, `${label}[]`, out, seen);
  for (const part of [...(node.oneOf ?? []), ...(node.anyOf ?? []), ...(node.allOf ?? [])]) {
    walk(part, label, out, seen);
  }
  if (typeof node.additionalProperties === 'object') walk(node.additionalProperties, label, out, seen);
}

/** `operationId: Schema.field` → the field's name, for every request property of every operation. */
function requestFields(): Map<string, string> {
  const fields = new Map<string, string>();
  for (const item of Object.values(spec.paths)) {
    for (const [method, op] of Object.entries(item)) {
      if (method === 'parameters' || Array.isArray(op)) continue;
      const id = op.operationId!;
      for (const p of (op.parameters ?? []).map(deref)) {
        if (p.in === 'query') fields.set(`${id}: query.${p.name}`, p.name!);
      }
      for (const media of Object.values(op.requestBody?.content ?? {})) {
        if (!media.schema) continue;
        const found = new Map<string, string>();
        walk(media.schema, 'body', found, new Set());
        for (const [where, name] of found) fields.set(`${id}: ${where}`, name);
      }
    }
  }
  return fields;
}

/** The name as code reads it: a property access, a destructured or quoted key, a Python key. */
function isRead(name: string): boolean {
  const esc = name.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  const ts = new RegExp(`(\\.${esc}\\b|['"\`]${esc}['"\`]|[{,]\\s*${esc}\\s*[,}:=])`);
  const py = new RegExp(`(['"]${esc}['"]|\\.${esc}\\b)`);
  return ts.test(serverText) || py.test(workerText);
}

describe('request fields', () => {
  it('every request property of the spec is read by the server or the worker', () => {
    const unread = [...requestFields()]
      .filter(([, name]) => !(name in ALLOWED) && !isRead(name))
      .map(([where]) => where)
      .sort();
    expect(unread).toEqual([]);
  });

  it('every allow-listed field is still a request field and has a reason', () => {
    const names = new Set(requestFields().values());
    for (const [name, reason] of Object.entries(ALLOWED)) {
      expect(names.has(name), name).toBe(true);
      expect(reason.length, name).toBeGreaterThan(10);
    }
  });
});
