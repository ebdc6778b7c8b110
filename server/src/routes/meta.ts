import { ApiError } from '../errors.js';
import type { Routes, Schemas } from '../http.js';
import { loadSpec } from '../spec.js';
import { serverVersion } from '../version.js';

export const metaRoutes: Routes = {
  async getHealth(_req, res, ctx) {
    try {
      await ctx.knex.raw('select 1');
    } catch {
      throw new ApiError(503, 'service_unavailable', 'Database unreachable.');
    }
    res.json({
      status: 'ok',
      database: ctx.dbKind === 'postgres' ? 'postgres' : 'pglite',
    } satisfies Schemas['Health']);
  },

  async getVersion(_req, res) {
    res.json({ version: serverVersion, api_version: loadSpec().info.version } satisfies Schemas['Version']);
  },
};
