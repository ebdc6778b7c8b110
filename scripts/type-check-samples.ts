/**
 * Type-checks docs code samples as a user's own files would be: each sample is a module held in
 * memory under `dir` (so package imports resolve from there, through the packages' exports) and
 * compiled with the tsconfig at `tsconfigPath`. Answers the errors as `file:line message`.
 * Used by packages/sdk/test/docs-samples.test.ts (@tunery/sdk samples) and
 * e2e/test/docs-openai-samples.test.ts (the `openai` client's samples).
 */
// No import.meta here: the SDK's type-check compiles this file as CommonJS.
import { join } from 'node:path';
import ts from 'typescript';

export function typeCheckSamples(dir: string, samples: Map<string, string>, tsconfigPath: string): string[] {
  const files = new Map([...samples].map(([name, source]) => [join(dir, `${name}.ts`), source]));
  const config = ts.getParsedCommandLineOfConfigFile(
    tsconfigPath,
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
  host.fileExists = (file) => files.has(file) || fileExists(file);
  host.readFile = (file) => files.get(file) ?? readFile(file);
  host.getSourceFile = (file, language, ...rest) => {
    const source = files.get(file);
    return source === undefined
      ? getSourceFile(file, language, ...rest)
      : ts.createSourceFile(file, source, language);
  };
  const program = ts.createProgram([...files.keys()], options, host);
  return ts.getPreEmitDiagnostics(program).map((d) => {
    const where = d.file
      ? `${d.file.fileName.replace(dir, '')}:${d.file.getLineAndCharacterOfPosition(d.start ?? 0).line + 1}`
      : '';
    return `${where} ${ts.flattenDiagnosticMessageText(d.messageText, '\n')}`;
  });
}
