import type { MockContext } from '../context.js';

/** The API version the mocks implement (the spec's `info.version`). */
export const MOCK_API_VERSION = '0.1.0';

export function metaHandlers({ router }: MockContext) {
  router.get('/v1/health', 'getHealth', ({ response }) =>
    response(200).json({ status: 'ok', database: 'pglite' }),
  );
  router.get('/v1/version', 'getVersion', ({ response }) =>
    response(200).json({ version: `${MOCK_API_VERSION}-mock`, api_version: MOCK_API_VERSION }),
  );
}
