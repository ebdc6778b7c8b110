import type { components } from '../../generated/api.js';
import { badJson, type MockContext } from '../context.js';
import type { MockState } from '../state.js';

export function budgetHandlers({ router, state }: MockContext) {
  router.get('/v1/budget', 'getBudget', ({ response }) => response(200).json(budgetView(state)));

  router.put('/v1/budget', 'updateBudget', async ({ request, response }) => {
    const body = await request.json().catch(badJson);
    state.budget.limit_usd = body.limit_usd;
    return response(200).json(budgetView(state));
  });
}

function budgetView(state: MockState): components['schemas']['Budget'] {
  const { limit_usd, spent_usd } = state.budget;
  const remaining = limit_usd === null ? null : Math.round((limit_usd - spent_usd) * 1e6) / 1e6;
  return { tenant_id: state.tenantId, limit_usd, spent_usd, remaining_usd: remaining };
}
