import { describe, expect, it } from 'vitest';
import { IDEMPOTENT_POST_PATHS, takesIdempotencyKey } from '../../src/core/idempotency.js';
import { loadSpec, operationsOf } from '../spec.js';

describe('IDEMPOTENT_POST_PATHS', () => {
  it('is exactly the POSTs whose operation declares the Idempotency-Key header', () => {
    const declared = operationsOf(loadSpec())
      .filter((op) => op.method === 'post')
      .filter((op) =>
        ((op.operation.parameters as { $ref?: string; name?: string }[] | undefined) ?? []).some(
          (p) => p.$ref === '#/components/parameters/IdempotencyKey' || p.name === 'Idempotency-Key',
        ),
      )
      .map((op) => op.path);
    expect([...IDEMPOTENT_POST_PATHS].sort()).toEqual(declared.sort());
  });

  it('applies to POST only', () => {
    expect(takesIdempotencyKey('POST', '/v1/training/jobs')).toBe(true);
    expect(takesIdempotencyKey('get', '/v1/training/jobs')).toBe(false);
    expect(takesIdempotencyKey('post', '/v1/training/jobs/{job_id}/cancel')).toBe(false);
  });
});
