// Type helpers that read request and response shapes out of the generated `paths` / `operations`.
// Nothing here declares an API shape of its own: every type is derived from src/generated/api.ts.
import type { operations, paths } from '../generated/api.js';

export type HttpMethod = 'get' | 'post' | 'put' | 'delete';

/** Paths that have an operation for `M`. */
export type PathsWith<M extends HttpMethod> = {
  [P in keyof paths]: paths[P][M] extends { responses: unknown } ? P : never;
}[keyof paths];

/** The operation object at `paths[P][M]`. */
export type OperationAt<P extends keyof paths, M extends HttpMethod> = NonNullable<paths[P][M]>;

type SuccessStatus = 200 | 201 | 202 | 206;

type JsonContent<R> = R extends { content: { 'application/json': infer B } } ? B : never;

/** The JSON body of an operation's 2xx response. */
export type SuccessBody<Op> = Op extends { responses: infer R }
  ? { [S in keyof R]: S extends SuccessStatus ? JsonContent<R[S]> : never }[keyof R]
  : never;

/** The path parameters of an operation. */
export type PathParams<Op> = Op extends { parameters: { path: infer P } }
  ? P extends Record<string, unknown>
    ? P
    : never
  : never;

/** The query parameters of an operation. */
export type QueryParams<Op> = Op extends { parameters: { query?: infer Q } }
  ? Q extends Record<string, unknown>
    ? Q
    : never
  : never;

/** The JSON request body of an operation. */
export type JsonRequestBody<Op> = Op extends { requestBody?: { content: { 'application/json': infer B } } }
  ? B
  : never;

/** The JSON request body of a named operation. */
export type RequestBodyOf<K extends keyof operations> = NonNullable<JsonRequestBody<operations[K]>>;

/** The query parameters of a named operation. */
export type QueryOf<K extends keyof operations> = NonNullable<QueryParams<operations[K]>>;

/** The 2xx JSON response of a named operation. */
export type ResponseOf<K extends keyof operations> = SuccessBody<operations[K]>;
