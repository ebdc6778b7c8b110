// Every @tunery/sdk sample in the API reference compiles against the built SDK, as a user would
// write it: `import { Tunery } from '@tunery/sdk'`, resolved through the package's exports to dist.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';
import { describe, expect, it } from 'vitest';
import { addCodeSamples, operations, type Spec } from '../../../scripts/docs-samples.js';
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
        if (sample.label === '@tunery/sdk')
          samples.set(join(packageDir, 'docs-samples', `${op.operationId}.ts`), sample.source);
      }
    }
    expect(samples.size).toBeGreaterThan(50);
    // The dataset upload (multipart) is shown with the SDK's own upload method, next to the JSON create.
    expect(samples.get(join(packageDir, 'docs-samples', 'createDataset.ts'))).toContain(
      'await tunery.datasets.upload({',
    );

    const config = ts.getParsedCommandLineOfConfigFile(
      join(packageDir, 'tsconfig.json'),
      {},
      {
        ...ts.sys,
        onUnRecoverableConfigFileDiagnostic: (d) => {
          throw new Error(ts.flattenDiagnosticMessageText(d.messageText, '\n'));
        },
      },
    )!;
    const options = { ...config.options, noEmit: true };
    const host = ts.createCompilerHost(options);
    const { getSourceFile, fileExists, readFile } = host;
    host.fileExists = (file) => samples.has(file) || fileExists(file);
    host.readFile = (file) => samples.get(file) ?? readFile(file);
    host.getSourceFile = (file, language, ...rest) => {
      const source = samples.get(file);
      return source === undefined
        ? getSourceFile(file, language, ...rest)
        : ts.createSourceFile(file, source, language);
    };
    const program = ts.createProgram([...samples.keys()], options, host);
    const errors = ts.getPreEmitDiagnostics(program).map((d) => {
      const where = d.file
        ? `${d.file.fileName.replace(packageDir, '')}:${d.file.getLineAndCharacterOfPosition(d.start ?? 0).line + 1}`
        : '';
      return `${where} ${ts.flattenDiagnosticMessageText(d.messageText, '\n')}`;
    });
    expect(errors).toEqual([]);
  }, 120_000);
});
