// Every @tunery/sdk sample in the API reference compiles against the built SDK, as a user would
// write it: `import { Tunery } from '@tunery/sdk'`, resolved through the package's exports to dist.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { addCodeSamples, operations, type Spec } from '../../../scripts/docs-samples.js';
import { typeCheckSamples } from '../../../scripts/type-check-samples.js';
import { loadSpec } from './spec.js';

const packageDir = fileURLToPath(new URL('..', import.meta.url));

describe('docs code samples', () => {
  it('every @tunery/sdk sample type-checks against the built SDK', () => {
    expect(existsSync(join(packageDir, 'dist/index.d.ts')), 'run `pnpm -C packages/sdk build` first').toBe(
      true,
    );
    // One module per sample, held in memory under the package folder so `@tunery/sdk` resolves to
    // the package itself (its dist types) and the package's tsconfig applies.
    const samples = new Map<string, string>();
    for (const op of operations(addCodeSamples(loadSpec() as unknown as Spec, join(packageDir, '../..')))) {
      for (const sample of op['x-codeSamples'] ?? []) {
        if (sample.label === '@tunery/sdk') samples.set(op.operationId, sample.source);
      }
    }
    expect(samples.size).toBeGreaterThan(50);
    // The dataset upload (multipart) is shown with the SDK's own upload method, next to the JSON create.
    expect(samples.get('createDataset')).toContain('await tunery.datasets.upload({');

    const errors = typeCheckSamples(
      join(packageDir, 'docs-samples'),
      samples,
      join(packageDir, 'tsconfig.json'),
    );
    expect(errors).toEqual([]);
  }, 120_000);
});
