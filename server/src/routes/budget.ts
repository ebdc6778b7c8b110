import { forbidden } from '../errors.js';
import { type BodyOf, isAdmin, type Routes, type Schemas, tenantOf } from '../http.js';
import { getBudget, setBudgetLimit } from '../services/budget.js';

export const budgetRoutes: Routes = {
  async getBudget(req, res, ctx) {
    res.json((await getBudget(ctx, tenantOf(req))) satisfies Schemas['Budget']);
  },

  async updateBudget(req, res, ctx) {
    const tenantId = tenantOf(req);
    if (!isAdmin(req)) throw forbidden('Only admin keys may change the budget.');
    const body = req.body as BodyOf<'updateBudget'>;
    res.json((await setBudgetLimit(ctx, tenantId, body.limit_usd)) satisfies Schemas['Budget']);
  },
};
