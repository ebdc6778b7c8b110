/**
 * Request and response validation compiled per operation when the routes are mounted, for the
 * operations on the hot paths: the worker protocol (claims, heartbeats, reports, completions) and
 * reading a training job. express-openapi-validator (every other operation) runs a chain of six
 * middlewares per request and builds its checks on the first request; here one middleware
 * authenticates and runs the operation's compiled schemas, and a response is checked by its
 * status's compiled schema.
 *
 * The two must answer alike: the Ajv options are the validator's own (OpenAPI 3.1 → JSON Schema
 * 2020-12, its formats with date-time.ts's in place of `date-time`, defaults filled into bodies,
 * first error only) and failures are thrown in the validator's error shape, so app.ts's error
 * handler turns both into the same answer (test/bound-validator.test.ts sends the same bad requests
 * to both). An operation using a feature this file does not implement (query or header parameters,
 * non-string path parameters, a body other than JSON, readOnly/writeOnly, discriminators) is refused
 * at mount time, not half-validated.
 */

import { Ajv2020, type ErrorObject, type ValidateFunction } from 'ajv/dist/2020.js';
import ajvFormats from 'ajv-formats';
import type { NextFunction, Request, Response } from 'express';
import { authenticateRequest, isSecurityScheme, type SecurityScheme } from './auth.js';
import type { AppContext } from './context.js';
import { STORABLE_DATE_TIME } from './date-time.js';
import type { ValidatorError } from './errors.js';
import { loadSpec, type SpecOperation } from './spec.js';

/**
 * The operations validated here: the worker protocol's JSON operations (every claim, heartbeat,
 * report and transition of a job or an inference request) and reading a training job. Every other
 * operation goes through express-openapi-validator.
 */
export const BOUND_OPERATIONS: ReadonlySet<string> = new Set([
  'getTrainingJob',
  'claimJob',
  'claimInference',
  'reportInference',
  'heartbeatJob',
  'waitGang',
  'heartbeatGangMember',
  'reportJobLogs',
  'reportJobMetrics',
  'reportJobEvents',
  'completeJob',
  'completeJobs',
  'failJob',
  'acknowledgeCancel',
  'releaseJob',
]);

const SPEC_ID = 'tunery-openapi';
/** Keywords express-openapi-validator gives a meaning beyond JSON Schema; refused here. */
const UNSUPPORTED_KEYWORDS = ['readOnly', 'writeOnly', 'discriminator', 'nullable'];

interface Parameter {
  name: string;
  in: string;
  schema?: { type?: string; $ref?: string };
  $ref?: string;
}
interface Operation {
  parameters?: Parameter[];
  security?: Record<string, string[]>[];
  requestBody?: { required?: boolean; content: Record<string, unknown> };
  responses: Record<string, { content?: Record<string, unknown>; $ref?: string }>;
}

const pointer = (...parts: string[]) =>
  parts.map((p) => p.replaceAll('~', '~0').replaceAll('/', '~1')).join('/');

/** The spec's object at `ref` (`#/components/...`). */
function resolve<T>(ref: string): T {
  let node: unknown = loadSpec();
  for (const part of ref.replace(/^#\//, '').split('/'))
    node = (node as Record<string, unknown>)[part.replaceAll('~1', '/').replaceAll('~0', '~')];
  return node as T;
}

/** Keywords whose value maps names, not keywords, to schemas. */
const SCHEMA_MAPS = new Set(['properties', 'patternProperties', '$defs', 'dependentSchemas']);
/** Keywords whose value is data, not a schema. */
const DATA_KEYWORDS = new Set(['default', 'const', 'enum', 'example', 'examples']);

/**
 * Throws when `schema` (or an operation, or a list of parameters), or a schema it references, uses
 * a keyword this file does not implement. A property named like such a keyword, or such a key in
 * an example, is not one.
 */
export function assertSupported(schema: unknown, where: string, seen = new Set<unknown>()): void {
  if (!schema || typeof schema !== 'object' || seen.has(schema)) return;
  seen.add(schema);
  for (const [key, value] of Object.entries(schema)) {
    if (DATA_KEYWORDS.has(key)) continue;
    if (UNSUPPORTED_KEYWORDS.includes(key) || key.startsWith('x-eov'))
      throw new Error(`${where}: bound validation does not implement '${key}'`);
    if (key === '$ref' && typeof value === 'string') assertSupported(resolve(value), where, seen);
    else if (SCHEMA_MAPS.has(key) && value && typeof value === 'object')
      for (const property of Object.values(value)) assertSupported(property, where, seen);
    else assertSupported(value, where, seen);
  }
}

let shared: { request: Ajv2020; response: Ajv2020 } | undefined;
/** The validator's Ajv settings (requests fill defaults), the spec loaded once into each for `$ref`s. */
function ajvs() {
  const make = (useDefaults: boolean) => {
    const ajv = new Ajv2020({
      strict: false,
      strictNumbers: true,
      strictTuples: true,
      allowUnionTypes: false,
      validateSchema: false,
      coerceTypes: false,
      useDefaults,
      removeAdditional: false,
      allErrors: false,
    });
    ajvFormats.default(ajv, { mode: 'fast' });
    ajv.addFormat('media-range', true);
    ajv.addFormat('date-time', STORABLE_DATE_TIME);
    ajv.addSchema({ ...loadSpec(), $id: SPEC_ID });
    return ajv;
  };
  shared ??= { request: make(true), response: make(false) };
  return shared;
}

const specRef = (...parts: string[]) => ({ $ref: `${SPEC_ID}#/${pointer(...parts)}` });

/** A refusal in the validator's shape, as an Error so that a logged 500 has its stack. */
const failure = (
  status: number,
  message: string,
  errors?: ValidatorError['errors'],
): Error & ValidatorError => Object.assign(new Error(message), { status, errors });

/** express-openapi-validator's error items: the failing value's path, the message (enums listed). */
function validatorErrors(status: number, errors: ErrorObject[]): Error & ValidatorError {
  const items = errors.map((e) => {
    const property = e.params.missingProperty ?? e.params.additionalProperty ?? e.params.unevaluatedProperty;
    const message =
      e.keyword === 'enum' && e.params.allowedValues
        ? `${e.message}: ${(e.params.allowedValues as unknown[]).join(', ')}`
        : e.message;
    return {
      path: property ? `${e.instancePath}/${property}` : e.instancePath,
      message,
      errorCode: `${e.keyword}.openapi.validation`,
    };
  });
  return failure(status, items.map((i) => `${i.path} ${i.message}`).join(', '), items);
}

/** Compiles the request side: path parameters and the JSON body, wrapped as the validator does. */
function compileRequest(op: SpecOperation, spec: Operation, pathLevel: Parameter[]) {
  const { request } = ajvs();
  // Each parameter's schema by its place in the spec, so its own `$ref`s resolve there.
  const placed = [
    ...pathLevel.map((p, i) => ({ p, at: ['paths', op.path, 'parameters', String(i)] })),
    ...(spec.parameters ?? []).map((p, i) => ({
      p,
      at: ['paths', op.path, op.method, 'parameters', String(i)],
    })),
  ].map(({ p, at }) =>
    p.$ref
      ? { p: resolve<Parameter>(p.$ref), ref: `${SPEC_ID}${p.$ref}/schema` }
      : { p, ref: `${SPEC_ID}#/${pointer(...at, 'schema')}` },
  );
  const properties: Record<string, unknown> = {};
  for (const { p, ref } of placed) {
    if (p.in !== 'path') throw new Error(`${op.operationId}: bound validation takes path parameters only`);
    const schema = p.schema?.$ref ? resolve<{ type?: string }>(p.schema.$ref) : p.schema;
    if (schema?.type !== 'string')
      throw new Error(`${op.operationId}: path parameter ${p.name} is not a string`);
    properties[p.name] = { $ref: ref };
  }
  const params = request.compile({
    type: 'object',
    properties: { params: { type: 'object', properties, required: Object.keys(properties) } },
  });
  const content = spec.requestBody?.content;
  if (content && Object.keys(content).join() !== 'application/json')
    throw new Error(`${op.operationId}: bound validation takes JSON bodies only`);
  const body = content
    ? request.compile({
        type: 'object',
        properties: {
          body: specRef('paths', op.path, op.method, 'requestBody', 'content', 'application/json', 'schema'),
        },
        required: spec.requestBody?.required ? ['body'] : [],
      })
    : undefined;
  return { params, body };
}

/** Compiles each status's JSON schema; a status without content must answer without a body. */
function compileResponses(op: SpecOperation, spec: Operation) {
  const { response } = ajvs();
  const byStatus = new Map<number, ValidateFunction | null>();
  for (const [status, value] of Object.entries(spec.responses)) {
    if (!/^\d{3}$/.test(status))
      throw new Error(`${op.operationId}: bound validation takes numeric response statuses only`);
    const content = (value.$ref ? resolve<typeof value>(value.$ref) : value).content;
    if (content && Object.keys(content).join() !== 'application/json')
      throw new Error(`${op.operationId}: bound validation takes JSON responses only`);
    const schema = value.$ref
      ? { $ref: `${SPEC_ID}${value.$ref}/content/application~1json/schema` }
      : specRef('paths', op.path, op.method, 'responses', status, 'content', 'application/json', 'schema');
    byStatus.set(Number(status), content ? response.compile({ properties: { response: schema } }) : null);
  }
  return byStatus;
}

/** The operation's security scheme (one, or none for a public operation). */
function schemeOf(op: SpecOperation, spec: Operation): SecurityScheme | null {
  const requirements = spec.security ?? (loadSpec() as unknown as Operation).security ?? [];
  if (requirements.length === 0) return null;
  if (requirements.some((r) => Object.keys(r).length === 0))
    throw new Error(`${op.operationId}: bound validation does not take optional security`);
  const schemes = requirements.flatMap((r) => Object.keys(r));
  if (schemes.length === 1 && isSecurityScheme(schemes[0]!)) return schemes[0];
  throw new Error(`${op.operationId}: bound validation takes one security scheme`);
}

const mediaType = (req: Request) => req.headers['content-type']?.split(';')[0]?.trim().toLowerCase();

/** The compiled checks of one operation: compiled once per process, whatever the number of apps. */
interface Checks {
  scheme: SecurityScheme | null;
  request: ReturnType<typeof compileRequest>;
  responses: Map<number, ValidateFunction | null>;
}
const compiled = new Map<string, Checks>();

function checksOf(op: SpecOperation): Checks {
  let checks = compiled.get(op.operationId);
  if (!checks) {
    const pathItem = loadSpec().paths[op.path] as { parameters?: Parameter[] } & Record<string, Operation>;
    const spec = pathItem[op.method] as Operation;
    assertSupported(spec, op.operationId);
    assertSupported(pathItem.parameters, op.operationId);
    checks = {
      scheme: schemeOf(op, spec),
      request: compileRequest(op, spec, pathItem.parameters ?? []),
      responses: compileResponses(op, spec),
    };
    compiled.set(op.operationId, checks);
  }
  return checks;
}

/**
 * Writes a JSON answer in one step, as Express's `res.json` would less what it does for requests
 * these operations never get: HEAD, and revalidation against an ETag (app.ts sets none). A status
 * without a body (checkResponse allows none for it) is sent empty.
 */
function sendJson(res: Response, body: unknown): Response {
  if (body === undefined) {
    res.end();
    return res;
  }
  const text = JSON.stringify(body);
  res.setHeader('Content-Type', 'application/json; charset=utf-8');
  res.setHeader('Content-Length', Buffer.byteLength(text));
  res.end(text);
  return res;
}

/**
 * The operation's validator, compiled now. In the validator's order: authenticates, checks the
 * content type, refuses query parameters (the bound operations have none), checks the path
 * parameters and the body (filling defaults); then validates what the handler answers with
 * `res.json` (not a 5xx, which the validator leaves alone too) and writes it (sendJson).
 */
export function boundValidator(ctx: AppContext, op: SpecOperation) {
  const { scheme, request, responses } = checksOf(op);

  const checkResponse = (status: number, body: unknown) => {
    if (status >= 500) return;
    const validate = responses.get(status);
    if (validate === undefined)
      throw failure(500, `no schema defined for status code '${status}' in the openapi spec`);
    if (validate === null) {
      if (body !== undefined) throw failure(500, 'response should NOT have a body');
      return;
    }
    if (body === undefined || body === null) throw failure(500, 'response body required.');
    if (!validate({ response: body })) throw validatorErrors(500, validate.errors ?? []);
  };

  const checkRequest = (req: Request) => {
    if (request.body) {
      const type = mediaType(req);
      if (type !== 'application/json')
        throw failure(415, type ? `unsupported media type ${type}` : 'media type not specified');
    }
    const [unknown] = Object.keys(req.query);
    if (unknown !== undefined)
      throw failure(400, `Unknown query parameter '${unknown}'`, [
        { path: `/query/${unknown}`, message: `Unknown query parameter '${unknown}'` },
      ]);
    if (!request.params({ params: req.params })) throw validatorErrors(400, request.params.errors ?? []);
    if (request.body && !request.body({ body: req.body }))
      throw validatorErrors(400, request.body.errors ?? []);
  };

  return async (req: Request, res: Response, next: NextFunction) => {
    try {
      if (scheme) await authenticateRequest(ctx.knex, req, scheme);
      checkRequest(req);
      res.json = (body: unknown) => {
        checkResponse(res.statusCode, body);
        return sendJson(res, body);
      };
      next();
    } catch (err) {
      next(err);
    }
  };
}
