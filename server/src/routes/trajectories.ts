import { notFound } from '../errors.js';
import {
  type BodyOf,
  iso,
  isoRequired,
  page,
  pathParam,
  type Routes,
  type Schemas,
  tenantOf,
} from '../http.js';
import { countTrajectory, maybeStartAutoTraining } from '../services/auto-training.js';
import { idempotent } from '../services/idempotency.js';
import { listPage, newestFirst } from '../services/paging.js';

const json = <T>(value: unknown): T => (typeof value === 'string' ? JSON.parse(value) : value) as T;

function summaryView(row: Record<string, unknown>): Schemas['TrajectorySummary'] {
  return {
    id: row.id as string,
    source: row.source as string,
    status: row.status as string,
    llm_call_count: Number(row.llm_call_count),
    start_time: iso(row.start_time as Date | null),
    end_time: iso(row.end_time as Date | null),
    created_at: isoRequired(row.created_at as Date),
  };
}

function trajectoryView(row: Record<string, unknown>): Schemas['Trajectory'] {
  return {
    ...summaryView(row),
    llm_calls: json<Schemas['LlmCall'][]>(row.llm_calls),
    provider_accesses: json<Record<string, unknown>[]>(row.provider_accesses),
    metadata: json<Record<string, unknown>>(row.metadata),
  };
}

export const trajectoryRoutes: Routes = {
  async createTrajectory(req, res, ctx) {
    const tenantId = tenantOf(req);
    const body = req.body as BodyOf<'createTrajectory'>;
    const { id, repeat } = await idempotent(ctx, req, 'createTrajectory', 'traj', async (trajectoryId) => {
      await ctx.knex.transaction(async (trx) => {
        await trx('trajectories').insert({
          id: trajectoryId,
          tenant_id: tenantId,
          source: body.source ?? 'api',
          status: body.status ?? 'completed',
          start_time: body.start_time ?? null,
          end_time: body.end_time ?? null,
          // arrays must go in as JSON text: node-postgres would send a JS array as a Postgres array
          llm_calls: JSON.stringify(body.llm_calls),
          provider_accesses: JSON.stringify(body.provider_accesses ?? []),
          metadata: JSON.stringify(body.metadata ?? {}),
          llm_call_count: body.llm_calls.length,
        });
        await countTrajectory(trx, tenantId);
      });
    });
    // A repeat was counted the first time; only a new trajectory may trigger a run.
    if (!repeat) await maybeStartAutoTraining(ctx, tenantId);
    const row = await ctx.knex('trajectories').where({ tenant_id: tenantId, id }).first();
    if (!row) throw notFound('trajectory', id, 'trajectory_id');
    res.status(201).json(trajectoryView(row) satisfies Schemas['Trajectory']);
  },

  async listTrajectories(req, res, ctx) {
    const tenantId = tenantOf(req);
    const body = {
      ...(await listPage(
        'trajectories',
        ctx
          .knex('trajectories')
          .where({ tenant_id: tenantId })
          .select('id', 'source', 'status', 'llm_call_count', 'start_time', 'end_time', 'created_at'),
        page(req),
        newestFirst(),
        (rows) => rows.map(summaryView),
      )),
      available: true as const,
    };
    res.json(body satisfies Schemas['TrajectoryList']);
  },

  async getTrajectory(req, res, ctx) {
    const tenantId = tenantOf(req);
    const id = pathParam(req, 'trajectory_id');
    const row = await ctx.knex('trajectories').where({ tenant_id: tenantId, id }).first();
    if (!row) throw notFound('trajectory', id, 'trajectory_id');
    res.json(trajectoryView(row) satisfies Schemas['Trajectory']);
  },
};
