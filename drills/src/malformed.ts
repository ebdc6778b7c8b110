/**
 * Malformed requests for every operation of the spec, from a seeded PRNG. Each request carries at
 * least one defect that the spec says must be refused (bad JSON, a wrong type, a path or query
 * parameter outside its schema, a value past its limit, a method the path does not have, bad
 * credentials, a content type the operation does not take, an oversized body, a bad header), so the
 * only right answer is a 4xx in the error shape. Harmless noise (odd `Accept`, random extra headers)
 * rides along.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parse } from 'yaml';
import { ROOT } from './harness-paths.js';

interface Schema {
  $ref?: string;
  type?: string | string[];
  properties?: Record<string, Schema>;
  items?: Schema;
  enum?: unknown[];
  pattern?: string;
  maxLength?: number;
  maximum?: number;
  minimum?: number;
  maxItems?: number;
  oneOf?: Schema[];
  anyOf?: Schema[];
  allOf?: Schema[];
}

interface Parameter {
  $ref?: string;
  name: string;
  in: 'path' | 'query' | 'header';
  required?: boolean;
  schema: Schema;
}

interface SpecOperation {
  operationId: string;
  parameters?: Parameter[];
  requestBody?: { required?: boolean; content: Record<string, { schema: Schema }> };
  security?: Record<string, string[]>[];
}

interface Spec {
  paths: Record<string, Record<string, SpecOperation | Parameter[]> & { parameters?: Parameter[] }>;
  components: { schemas: Record<string, Schema>; parameters: Record<string, Parameter> };
  security?: Record<string, string[]>[];
}

export interface Operation {
  operationId: string;
  method: string;
  path: string;
  /** Methods the path does not define (among the ones fetch can send). */
  otherMethods: string[];
  pathParams: Parameter[];
  queryParams: Parameter[];
  headerParams: Parameter[];
  /** The JSON body schema (resolved), when the operation takes JSON. */
  jsonBody: Schema | undefined;
  bodyRequired: boolean;
  contentTypes: string[];
  auth: 'user' | 'worker' | 'none';
}

export interface MalformedRequest {
  n: number;
  defect: string;
  operationId: string;
  method: string;
  path: string;
  headers: Record<string, string>;
  body?: string | Uint8Array<ArrayBuffer>;
}

/** A request before it is numbered and labelled. */
type Built = Omit<MalformedRequest, 'n' | 'operationId' | 'defect'>;

export interface Credentials {
  userKey: string;
  workerToken: string;
  /** Real ids to put in path parameters now and then, so defects also land on existing objects. */
  ids: Partial<Record<string, string[]>>;
  /** TUNERY_MAX_JSON_BYTES of the server under test. */
  maxJsonBytes: number;
}

const METHODS = ['get', 'post', 'put', 'patch', 'delete'];

export function loadOperations(specPath = join(ROOT, 'openapi/openapi.yaml')): Operation[] {
  const spec = parse(readFileSync(specPath, 'utf8')) as Spec;
  const deref = <T extends { $ref?: string }>(value: T): T => {
    let current: T = value;
    while (current?.$ref) {
      const [, , section, name] = current.$ref.split('/');
      current = (spec.components as unknown as Record<string, Record<string, T>>)[section!]![name!]!;
    }
    return current;
  };
  const operations: Operation[] = [];
  for (const [path, item] of Object.entries(spec.paths)) {
    const shared = (item.parameters ?? []).map(deref);
    const defined = METHODS.filter((m) => item[m]);
    for (const method of defined) {
      const op = item[method] as SpecOperation;
      const params = [...shared, ...(op.parameters ?? []).map(deref)].map((p) => ({
        ...p,
        schema: deref(p.schema),
      }));
      const content = op.requestBody?.content ?? {};
      const security = op.security ?? spec.security ?? [];
      const scheme = security[0] ? Object.keys(security[0])[0] : undefined;
      operations.push({
        operationId: op.operationId,
        method: method.toUpperCase(),
        path,
        otherMethods: METHODS.filter((m) => !item[m]).map((m) => m.toUpperCase()),
        pathParams: params.filter((p) => p.in === 'path'),
        queryParams: params.filter((p) => p.in === 'query'),
        headerParams: params.filter((p) => p.in === 'header'),
        jsonBody: content['application/json']
          ? resolveDeep(content['application/json'].schema, deref)
          : undefined,
        contentTypes: Object.keys(content),
        bodyRequired: Boolean(op.requestBody?.required),
        auth: scheme === 'workerToken' ? 'worker' : scheme === 'apiKey' ? 'user' : 'none',
      });
    }
  }
  return operations;
}

/** The body schema with its top-level and property `$ref`s resolved (one level is all the generator reads). */
function resolveDeep(schema: Schema, deref: <T extends { $ref?: string }>(value: T) => T): Schema {
  const top = deref(schema);
  const properties: Record<string, Schema> = {};
  for (const [name, prop] of Object.entries(top.properties ?? {})) properties[name] = deref(prop);
  return { ...top, properties };
}

const typesOf = (schema: Schema): string[] =>
  schema.type === undefined ? [] : Array.isArray(schema.type) ? schema.type : [schema.type];

/**
 * Values of none of `types`. The server validates bodies with `coerceTypes`, which turns scalars into
 * each other (12 → "12", "true" → true, "" → 0), so a scalar field only gets arrays and objects, and a
 * container field gets the other container or a scalar (neither is coerced into a container).
 */
function wrongTypedValues(types: string[]): unknown[] {
  const containers: [string, unknown][] = [
    ['array', [1, 'two', { three: 3 }]],
    ['object', { nested: { deeper: [] } }],
  ];
  const wrong = containers.filter(([kind]) => !types.includes(kind)).map(([, value]) => value);
  if (types.includes('array') || types.includes('object')) wrong.push('not-a-container', 12345, true);
  return wrong;
}

/** Path segments (decoded) that break every id/name pattern of the spec. */
const BAD_SEGMENTS = [
  'has space',
  'semi;colon',
  "quote'd",
  '<script>alert(1)</script>',
  '%00',
  'nul\u0000byte',
  'a/b',
  'a\\b',
  '☃ snowman',
  'ünïcödé',
  "1' OR '1'='1",
  '-leading-dash',
  '_'.repeat(300),
  'x'.repeat(5000),
  '$(id)',
  '{{7*7}}',
  'dot..dot/',
  '\t\n',
];

const BAD_JSON = [
  '{',
  '{"a":',
  '{"a" 1}',
  "{'single': 'quotes'}",
  '[1, 2',
  '{"a": 1}}',
  'nul',
  'tru',
  '{"a": "\\x41"}',
  '{"a": 01}',
  '{"a": NaN}',
  '{"a": undefined}',
  '{"a":1,}',
  '\u0000',
  `{"deep": ${'['.repeat(500)}`,
  '"unterminated',
];

export class RequestFactory {
  private count = 0;

  constructor(
    private readonly random: () => number,
    private readonly creds: Credentials,
  ) {}

  private pick<T>(items: readonly T[]): T {
    return items[Math.floor(this.random() * items.length)]!;
  }

  private chance(p: number): boolean {
    return this.random() < p;
  }

  private hex(length: number): string {
    let out = '';
    while (out.length < length) out += Math.floor(this.random() * 16).toString(16);
    return out;
  }

  /** A value its parameter's schema accepts (a real id now and then). */
  private validPathValue(param: Parameter): string {
    const real = this.creds.ids[param.name];
    if (real?.length && this.chance(0.5)) return this.pick(real);
    const pattern = param.schema.pattern ?? '';
    if (pattern.includes('._-]{0,199}')) return this.pick(['adapter_model.safetensors', 'notes.txt']);
    if (pattern.includes('._-]')) return `drill-${this.hex(6)}`;
    return `drill_${this.hex(24)}`;
  }

  /** A decoded path value that does not match the parameter's pattern. */
  private invalidPathValue(param: Parameter): string {
    const pattern = new RegExp(param.schema.pattern ?? '^$');
    for (;;) {
      const value = this.pick(BAD_SEGMENTS);
      if (!pattern.test(value)) return value;
    }
  }

  private buildPath(op: Operation, override?: { name: string; value: string }): string {
    return op.path.replace(/\{([^}]+)\}/g, (_, name: string) => {
      const param = op.pathParams.find((p) => p.name === name)!;
      const value = override?.name === name ? override.value : this.validPathValue(param);
      return encodeURIComponent(value);
    });
  }

  private authHeaders(op: Operation): Record<string, string> {
    if (op.auth === 'none') return {};
    return { authorization: `Bearer ${op.auth === 'worker' ? this.creds.workerToken : this.creds.userKey}` };
  }

  /** A plausible (not necessarily valid) JSON body for operations that take one. */
  private plausibleBody(op: Operation): string | undefined {
    if (!op.jsonBody) return op.method === 'GET' ? undefined : this.chance(0.5) ? '{}' : undefined;
    const body: Record<string, unknown> = {};
    for (const [name, prop] of Object.entries(op.jsonBody.properties ?? {})) {
      if (!this.chance(0.4)) continue;
      const types = typesOf(prop);
      body[name] = types.includes('string')
        ? `drill-${this.hex(4)}`
        : types.includes('integer') || types.includes('number')
          ? 1
          : types.includes('boolean')
            ? false
            : types.includes('array')
              ? []
              : {};
    }
    return JSON.stringify(body);
  }

  private noise(headers: Record<string, string>): void {
    if (this.chance(0.4))
      headers.accept = this.pick(['text/html', 'application/xml', '*/*', 'text/plain', 'image/png']);
    if (this.chance(0.3)) headers[`x-drill-${this.hex(4)}`] = this.pick(['', 'x'.repeat(2000), '\t', '%00']);
    if (this.chance(0.2)) headers['user-agent'] = `drill/${this.hex(8)}`;
  }

  /** The defects that apply to `op`, each a function producing one request. */
  private defects(op: Operation): [string, () => Built][] {
    const withBody = op.method !== 'GET';
    const json = { 'content-type': 'application/json' };
    const base = () => ({ method: op.method, headers: { ...this.authHeaders(op) } });
    const out: [string, () => Built][] = [];

    out.push([
      'query: unknown or wrongly typed parameter',
      () => {
        const params = new URLSearchParams();
        const typed = op.queryParams.filter(
          (p) => p.schema.enum || p.schema.pattern || /integer|number/.test(typesOf(p.schema).join()),
        );
        if (typed.length && this.chance(0.7)) {
          const param = this.pick(typed);
          const types = typesOf(param.schema);
          const bad =
            types.includes('integer') || types.includes('number')
              ? this.pick(['abc', '1e999x', '--1', '0x', 'NaN', '[]', '1,2'])
              : param.schema.enum
                ? `not-${this.hex(6)}`
                : this.invalidPathValue(param);
          params.set(param.name, bad);
        } else {
          params.set(
            `drill_${this.hex(6)}`,
            this.pick(['1', '', 'x'.repeat(3000), '%00', '[object Object]']),
          );
        }
        const body = withBody ? this.plausibleBody(op) : undefined;
        const r = base();
        return {
          ...r,
          headers: body === undefined ? r.headers : { ...r.headers, ...json },
          path: `${this.buildPath(op)}?${params}`,
          body,
        };
      },
    ]);

    if (op.pathParams.length)
      out.push([
        'path: parameter outside its pattern',
        () => {
          const param = this.pick(op.pathParams);
          const body = withBody ? this.plausibleBody(op) : undefined;
          const r = base();
          return {
            ...r,
            headers: body === undefined ? r.headers : { ...r.headers, ...json },
            path: this.buildPath(op, { name: param.name, value: this.invalidPathValue(param) }),
            body,
          };
        },
      ]);

    if (withBody)
      out.push([
        'body: malformed JSON or random bytes',
        () => {
          let body: string | Uint8Array<ArrayBuffer> = this.pick(BAD_JSON);
          if (this.chance(0.3)) {
            const bytes = new Uint8Array(1 + Math.floor(this.random() * 300));
            for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(this.random() * 256);
            bytes[0] = 0x7b; // `{`, so it is never a bare number or string
            body = bytes;
          }
          return { ...base(), headers: { ...base().headers, ...json }, path: this.buildPath(op), body };
        },
      ]);

    const typed = Object.entries(op.jsonBody?.properties ?? {}).filter(([, s]) => typesOf(s).length);
    if (op.jsonBody && typed.length)
      out.push([
        'body: wrong types',
        () => {
          const body: Record<string, unknown> = {};
          for (const [name, prop] of typed) {
            if (Object.keys(body).length === 0 || this.chance(0.3))
              body[name] = this.pick(wrongTypedValues(typesOf(prop)));
          }
          const asText = this.chance(0.15)
            ? this.pick(['[1, 2, 3]', '"a string"', '[]', `[${JSON.stringify(body)}]`])
            : JSON.stringify(body);
          return {
            ...base(),
            headers: { ...base().headers, ...json },
            path: this.buildPath(op),
            body: asText,
          };
        },
      ]);

    const limited = Object.entries(op.jsonBody?.properties ?? {}).filter(
      ([, s]) => s.maxLength !== undefined || s.maximum !== undefined || s.minimum !== undefined,
    );
    if (limited.length)
      out.push([
        'body: huge value past its limit',
        () => {
          const [name, prop] = this.pick(limited);
          let value: string;
          if (prop.maxLength !== undefined && typesOf(prop).includes('string'))
            value = JSON.stringify('x'.repeat(prop.maxLength + 1 + Math.floor(this.random() * 1000)));
          else if (prop.maximum !== undefined)
            value = this.pick([
              '1e400',
              '1e308',
              String(prop.maximum * 1000 + 7),
              '123456789012345678901234567890',
            ]);
          else value = this.pick(['-1e400', '-1e308', '-123456789012345678901234567890']);
          return {
            ...base(),
            headers: { ...base().headers, ...json },
            path: this.buildPath(op),
            body: `{${JSON.stringify(name)}: ${value}}`,
          };
        },
      ]);

    if (withBody)
      out.push([
        'body: nested deeper than 64 levels',
        () => {
          const depth = 65 + Math.floor(this.random() * 20_000);
          const [open, close] = this.chance(0.5) ? ['[', ']'] : ['{"a":', '}'];
          const inner = open === '[' ? '0' : '{}';
          const body = `{"drill":${open.repeat(depth)}${inner}${close.repeat(depth)}}`;
          return { ...base(), headers: { ...base().headers, ...json }, path: this.buildPath(op), body };
        },
      ]);

    const strings = Object.keys(op.jsonBody?.properties ?? {}).filter((name) =>
      typesOf(op.jsonBody!.properties![name]!).includes('string'),
    );
    if (strings.length)
      out.push([
        'body: a string with a lone UTF-16 surrogate',
        () => {
          const name = this.pick(strings);
          // Raw JSON text: the escape of one half of a surrogate pair, which no database can store.
          const half = this.pick(['\\ud800', '\\udbff', '\\udc00', '\\udfff']);
          return {
            ...base(),
            headers: { ...base().headers, ...json },
            path: this.buildPath(op),
            body: `{${JSON.stringify(name)}: "drill ${half} text"}`,
          };
        },
      ]);

    if (withBody)
      out.push([
        'body: larger than TUNERY_MAX_JSON_BYTES',
        () => ({
          ...base(),
          headers: { ...base().headers, ...json },
          path: this.buildPath(op),
          body: JSON.stringify({ name: 'y'.repeat(this.creds.maxJsonBytes + 1024) }),
        }),
      ]);

    if (op.otherMethods.length)
      out.push([
        'method: not defined for the path',
        () => {
          const method = this.pick(op.otherMethods);
          const body = method === 'GET' ? undefined : this.plausibleBody(op);
          return {
            method,
            headers: { ...this.authHeaders(op), ...(body === undefined ? {} : json) },
            path: this.buildPath(op),
            body,
          };
        },
      ]);

    if (op.auth !== 'none')
      out.push([
        'auth: missing or wrong credentials',
        () => {
          const wrongKind = op.auth === 'worker' ? this.creds.userKey : this.creds.workerToken;
          const authorization = this.pick([
            undefined,
            'Bearer',
            'Bearer ',
            `Bearer tk_${this.hex(32)}`,
            `Bearer tw_${this.hex(32)}`,
            'Basic dXNlcjpwYXNzd29yZA==',
            `Bearer ${wrongKind}`,
            `Token ${this.creds.userKey}`,
            `Bearer ${this.creds.userKey} ${this.creds.workerToken}`,
            `Bearer ${'A'.repeat(4000)}`,
          ]);
          const body = withBody ? this.plausibleBody(op) : undefined;
          const headers: Record<string, string> = body === undefined ? {} : { ...json };
          if (authorization !== undefined) headers.authorization = authorization;
          return { method: op.method, headers, path: this.buildPath(op), body };
        },
      ]);

    if (op.contentTypes.length)
      out.push([
        'content-type: one the operation does not take',
        () => {
          const types = [
            'text/plain',
            'application/xml',
            'application/x-www-form-urlencoded',
            'text/html',
            'multipart/form-data',
            'application/json-patch+json',
            'application/octet-stream',
            'application/json',
          ].filter((t) => !op.contentTypes.includes(t) && !(t === 'multipart/form-data' && op.jsonBody));
          // No content type at all is a defect only where the body is required.
          const contentType = this.pick(op.bodyRequired ? [...types, 'none'] : types);
          const text = op.jsonBody ? (this.plausibleBody(op) ?? '{}') : '{"not": "bytes"}';
          const headers: Record<string, string> = { ...this.authHeaders(op) };
          // Without a content-type header, fetch would label a string body text/plain: send bytes.
          if (contentType !== 'none') headers['content-type'] = contentType;
          return {
            method: op.method,
            headers,
            path: this.buildPath(op),
            body: contentType === 'none' ? new TextEncoder().encode(text) : text,
          };
        },
      ]);

    const headerParams = op.headerParams.filter((p) => p.schema.maxLength !== undefined);
    if (headerParams.length)
      out.push([
        'header: parameter past its limit or missing',
        () => {
          const param = this.pick(headerParams);
          const headers: Record<string, string> = { ...this.authHeaders(op) };
          const missing = param.required && this.chance(0.3);
          if (!missing)
            headers[param.name.toLowerCase()] = 'h'.repeat(
              param.schema.maxLength! + 1 + Math.floor(this.random() * 50),
            );
          const required = op.headerParams.filter((p) => p.required && p.name !== param.name);
          for (const p of required) headers[p.name.toLowerCase()] = `drill-${this.hex(8)}`;
          const body = withBody
            ? op.jsonBody
              ? this.plausibleBody(op)
              : new TextEncoder().encode('drill bytes')
            : undefined;
          if (typeof body === 'string') headers['content-type'] = 'application/json';
          else if (body) headers['content-type'] = 'application/octet-stream';
          return { method: op.method, headers, path: this.buildPath(op), body };
        },
      ]);

    return out;
  }

  /** One malformed request for `op`. */
  make(op: Operation): MalformedRequest {
    const [defect, build] = this.pick(this.defects(op));
    const request = build();
    this.noise(request.headers);
    return { n: this.count++, defect, operationId: op.operationId, ...request };
  }
}
