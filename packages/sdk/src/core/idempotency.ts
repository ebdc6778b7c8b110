// Which requests get an Idempotency-Key: every POST whose operation declares the header in the spec.
import type { paths } from '../generated/api.js';

type DeclaresIdempotencyKey<Op> = Op extends { parameters: { header?: infer H } }
  ? [NonNullable<H>] extends [never] // `header?: never`: no header parameters at all
    ? false
    : 'Idempotency-Key' extends keyof NonNullable<H>
      ? true
      : false
  : false;

/** POST paths whose operation takes the `Idempotency-Key` header, computed from the spec's types. */
export type IdempotentPostPath = {
  [P in keyof paths]: DeclaresIdempotencyKey<paths[P]['post']> extends true ? P : never;
}[keyof paths];

/** The same set at run time. The compiler checks it against the spec both ways (see below). */
export const IDEMPOTENT_POST_PATHS = [
  '/v1/distillation',
  '/v1/distillation/{job_id}/resume',
  '/v1/training/jobs',
  '/v1/training/jobs/{job_id}/resume',
  '/v1/training/jobs/{job_id}/merge',
  '/v1/training/templates',
  '/v1/datasets',
  '/v1/datasets/build',
  '/v1/trajectories',
  '/v1/base-models',
  '/v1/models/{model_id}/benchmark',
  '/v1/webhooks',
] as const satisfies readonly IdempotentPostPath[];

// Fails to compile when the spec gains an idempotent POST that the list above lacks.
type Unlisted = Exclude<IdempotentPostPath, (typeof IDEMPOTENT_POST_PATHS)[number]>;
const everyIdempotentPostIsListed: [Unlisted] extends [never] ? true : Unlisted = true;
void everyIdempotentPostIsListed;

const idempotentPaths: ReadonlySet<string> = new Set(IDEMPOTENT_POST_PATHS);

/** Whether a request to `path` (the spec's template, e.g. `/v1/training/jobs/{job_id}/merge`) takes a key. */
export function takesIdempotencyKey(method: string, path: string): boolean {
  return method.toLowerCase() === 'post' && idempotentPaths.has(path);
}

/** A fresh key: a random UUID (v4). */
export function newIdempotencyKey(): string {
  return globalThis.crypto.randomUUID();
}
