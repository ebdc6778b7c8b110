/**
 * OpenAI's `models`: the base models you can fine-tune (by catalog name, as `model` takes them)
 * and your fine-tuned models (by Tunery model id, as `fine_tuned_model` names them).
 */
import type { Knex } from 'knex';
import { notFound } from '../../errors.js';
import { pathParam, type Routes, type Schemas, tenantOf } from '../../http.js';
import { unixSeconds } from './paging.js';

type Model = Schemas['OpenAIModel'];

/** The catalog's shipped entries and the tenant's own. */
const baseModels = (knex: Knex, tenantId: string) =>
  knex('base_models').where((q) => q.where('tenant_id', tenantId).orWhereNull('tenant_id'));

const baseModelView = (row: Record<string, unknown>): Model => ({
  id: row.name as string,
  object: 'model',
  created: unixSeconds(row.created_at as Date),
  owned_by: row.tenant_id == null ? 'tunery' : (row.tenant_id as string),
});

const fineTunedView = (row: Record<string, unknown>): Model => ({
  id: row.id as string,
  object: 'model',
  created: unixSeconds(row.created_at as Date),
  owned_by: row.tenant_id as string,
});

export const openAIModelRoutes: Routes = {
  async listOpenAIModels(req, res, ctx) {
    const tenantId = tenantOf(req);
    const [base, tuned] = await Promise.all([
      baseModels(ctx.knex, tenantId).orderBy([{ column: 'created_at' }, { column: 'name' }]),
      ctx
        .knex('models')
        .where({ tenant_id: tenantId })
        .orderBy([{ column: 'created_at' }, { column: 'id' }]),
    ]);
    res.json({
      object: 'list',
      data: [...base.map(baseModelView), ...tuned.map(fineTunedView)],
    } satisfies Schemas['OpenAIModelList']);
  },

  async getOpenAIModel(req, res, ctx) {
    const tenantId = tenantOf(req);
    const id = pathParam(req, 'model');
    const tuned = await ctx.knex('models').where({ tenant_id: tenantId, id }).first();
    if (tuned) {
      res.json(fineTunedView(tuned) satisfies Model);
      return;
    }
    // the tenant's entry of that name before the shipped one, as training resolves it
    const base = await baseModels(ctx.knex, tenantId)
      .andWhere('name', id)
      .orderByRaw('tenant_id IS NULL')
      .first();
    if (!base) throw notFound('model', id, 'model', 'model_not_found');
    res.json(baseModelView(base) satisfies Model);
  },
};
