import { describe, expect, it } from 'vitest';
import { DEFAULTED_REQUEST_FIELDS } from '../../src/core/request-defaults.js';
import { dereference, loadSpec, operationsOf } from '../spec.js';

type Schema = Record<string, unknown>;

// Property names with a `default`, anywhere in a (dereferenced) schema.
function defaultedNames(schema: unknown, out = new Set<string>()): Set<string> {
  if (Array.isArray(schema)) for (const s of schema) defaultedNames(s, out);
  else if (schema && typeof schema === 'object') {
    const s = schema as Schema;
    for (const [name, property] of Object.entries((s.properties as Schema | undefined) ?? {})) {
      if (property && typeof property === 'object' && 'default' in property) out.add(name);
    }
    for (const value of Object.values(s)) defaultedNames(value, out);
  }
  return out;
}

describe('DEFAULTED_REQUEST_FIELDS', () => {
  it('names, for each operation, exactly the defaulted fields of its JSON request body', () => {
    const expected: Record<string, string[]> = {};
    for (const op of operationsOf(dereference(loadSpec()))) {
      const body = op.operation.requestBody as { content?: Record<string, { schema?: unknown }> } | undefined;
      const schema = body?.content?.['application/json']?.schema;
      const names = [...defaultedNames(schema)].sort();
      if (names.length) expected[op.operationId] = names;
    }
    const actual = Object.fromEntries(
      Object.entries(DEFAULTED_REQUEST_FIELDS).map(([k, v]) => [k, [...v].sort()]),
    );
    expect(actual).toEqual(expected);
  });
});
