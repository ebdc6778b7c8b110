import { defineConfig } from 'tsup';
import pkg from './package.json' with { type: 'json' };

export default defineConfig({
  entry: { index: 'src/index.ts', 'mocks/index': 'src/mocks/index.ts' },
  format: ['esm', 'cjs'],
  dts: true,
  clean: true,
  sourcemap: true,
  target: 'node20',
  // The User-Agent carries the package's version, read from package.json at build time.
  define: { __SDK_VERSION__: JSON.stringify(pkg.version) },
  // openapi-msw ships ESM only, and openapi-fetch's CommonJS build sets `exports.default` without
  // `__esModule`, which Node's interop turns into an object. Bundling both (a few KB) makes the CJS
  // build work; openapi-fetch stays a dependency for the types the .d.ts files import from it.
  noExternal: ['openapi-msw', 'openapi-fetch'],
});
