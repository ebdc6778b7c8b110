/**
 * Checks every answer the SDK client gets from the live server against the spec made strict:
 * `additionalProperties: false` on every object that declares its properties, so a field the server
 * sends but the spec does not declare (and the SDK's types therefore hide) fails the run. The server
 * itself validates its responses against the lenient spec; this finds what that lets through.
 */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import type { Middleware } from '@tunery/sdk';
import { Ajv2020, type ValidateFunction } from 'ajv/dist/2020.js';
import formats from 'ajv-formats';
import { parse } from 'yaml';

type Json = Record<string, unknown>;

const SPEC_PATH = fileURLToPath(new URL('../../openapi/openapi.yaml', import.meta.url));

/** Sets `additionalProperties: false` on every object schema with `properties` and no say of its own. */
function strict(node: unknown): void {
  if (!node || typeof node !== 'object') return;
  if (Array.isArray(node)) {
    for (const item of node) strict(item);
    return;
  }
  const schema = node as Json;
  if (schema.properties && schema.additionalProperties === undefined && !schema.allOf) {
    schema.additionalProperties = false;
  }
  for (const value of Object.values(schema)) strict(value);
}

function strictSpec(): Json {
  const spec = parse(readFileSync(SPEC_PATH, 'utf8')) as Json;
  // A schema that is one member of an allOf must not refuse the other members' properties.
  const members = new Set<string>();
  JSON.stringify(spec, (key, value) => {
    if (key === 'allOf' && Array.isArray(value)) {
      for (const member of value as Json[]) if (typeof member.$ref === 'string') members.add(member.$ref);
    }
    return value;
  });
  const schemas = (spec.components as Json).schemas as Record<string, Json>;
  for (const [name, schema] of Object.entries(schemas)) {
    if (members.has(`#/components/schemas/${name}`)) for (const value of Object.values(schema)) strict(value);
    else strict(schema);
  }
  strict(spec.paths);
  return spec;
}

/** `/v1/training/jobs/{job_id}` → its JSON pointer segment. */
const pointer = (key: string) => key.replaceAll('~', '~0').replaceAll('/', '~1');

export interface StrictResponses {
  /** Add to a client with `client.use(...)`. */
  middleware: Middleware;
  /** Every answer checked so far that broke the strict spec, as `METHOD path status: problem`. */
  problems(): Promise<string[]>;
  /** How many JSON answers were checked, by `METHOD path`. */
  checked(): Promise<Map<string, number>>;
}

export function strictResponses(): StrictResponses {
  const spec = strictSpec();
  const ajv = new Ajv2020({ strict: false, allErrors: true });
  (formats as unknown as { default: (a: Ajv2020) => void }).default(ajv);
  ajv.addSchema(spec, 'spec');
  const validators = new Map<string, ValidateFunction | null>();
  const validatorFor = (path: string, method: string, status: number) => {
    const key = `${method} ${path} ${status}`;
    if (!validators.has(key)) {
      const operation = ((spec.paths as Json)[path] as Json | undefined)?.[method] as Json | undefined;
      let declared = (operation?.responses as Json | undefined)?.[String(status)] as Json | undefined;
      let at = `#/paths/${pointer(path)}/${method}/responses/${status}`;
      // Error answers are shared: `{$ref: '#/components/responses/…'}`.
      if (typeof declared?.$ref === 'string') {
        at = declared.$ref;
        const name = at.split('/').pop()!;
        declared = ((spec.components as Json).responses as Json)[name] as Json;
      }
      const json = (declared?.content as Json | undefined)?.['application/json'];
      validators.set(key, json ? ajv.compile({ $ref: `spec${at}/content/application~1json/schema` }) : null);
    }
    return validators.get(key);
  };

  const problems: string[] = [];
  const counts = new Map<string, number>();
  const pending: Promise<void>[] = [];
  const check = async (method: string, path: string, response: Response) => {
    if (!response.headers.get('content-type')?.startsWith('application/json')) return;
    const label = `${method.toUpperCase()} ${path}`;
    counts.set(label, (counts.get(label) ?? 0) + 1);
    const validate = validatorFor(path, method.toLowerCase(), response.status);
    if (validate === null) {
      problems.push(`${label} ${response.status}: no JSON answer declared`);
      return;
    }
    const body = await response.json();
    if (!validate?.(body)) {
      const errors = (validate?.errors ?? []).map(
        (e) => `body${e.instancePath} ${e.message} ${JSON.stringify(e.params)}`,
      );
      problems.push(`${label} ${response.status}: ${errors.join('; ')}`);
    }
  };
  return {
    middleware: {
      onResponse({ request, response, schemaPath }) {
        pending.push(check(request.method, schemaPath, response.clone()));
        return undefined;
      },
    },
    async problems() {
      await Promise.all(pending);
      return [...new Set(problems)];
    },
    async checked() {
      await Promise.all(pending);
      return counts;
    },
  };
}
