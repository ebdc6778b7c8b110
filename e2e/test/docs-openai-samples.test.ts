// Every `openai` client sample in the API reference (the OpenAI-compatible surface) compiles against
// the official `openai` package, as a user's program would: a renamed or retyped client method, or a
// sample that passes what the client does not take, fails here. The calls themselves run against a
// live server in openai.test.ts.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect, it } from 'vitest';
import { parse } from 'yaml';
import { addCodeSamples, operations, type Spec } from '../../scripts/docs-samples.js';
import { typeCheckSamples } from '../../scripts/type-check-samples.js';

const e2eDir = fileURLToPath(new URL('..', import.meta.url));
const root = join(e2eDir, '..');

it('every openai client sample type-checks against the openai package', () => {
  const spec = parse(readFileSync(join(root, 'openapi/openapi.yaml'), 'utf8')) as Spec;
  const samples = new Map<string, string>();
  for (const op of operations(addCodeSamples(spec, root))) {
    for (const sample of op['x-codeSamples'] ?? []) {
      if (sample.label === 'openai') samples.set(op.operationId, sample.source);
    }
  }
  // files, fine-tuning jobs (with events and checkpoints), chat and text completions, models
  expect(samples.size).toBeGreaterThanOrEqual(15);
  expect(typeCheckSamples(join(e2eDir, 'docs-samples'), samples, join(e2eDir, 'tsconfig.json'))).toEqual([]);
}, 120_000);
