// Environment variables, read only where a `process` exists (Node, Bun, Deno's compat layer).
export function readEnv(name: string): string | undefined {
  const env = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process?.env;
  const value = env?.[name]?.trim();
  return value ? value : undefined;
}

declare const __SDK_VERSION__: string | undefined;
/**
 * This package's version: tsup and vitest define it from package.json; source run some other way
 * (tsx, say) reports `source`.
 */
export const SDK_VERSION: string = typeof __SDK_VERSION__ === 'string' ? __SDK_VERSION__ : 'source';

/** True in a web page or web worker, where an API key in the code is readable by anyone who loads it. */
export function isRunningInBrowser(): boolean {
  const g = globalThis as {
    window?: unknown;
    document?: unknown;
    importScripts?: unknown;
    process?: unknown;
  };
  return (
    (typeof g.window === 'object' && typeof g.document === 'object') || typeof g.importScripts === 'function'
  );
}
