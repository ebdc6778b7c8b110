import type { components } from '../../generated/api.js';
import { badJson, idempotencyKeyOf, type MockContext, pageOf, remember, replayed } from '../context.js';
import { MockHttpError, notFound } from '../errors.js';
import { type MockState, now } from '../state.js';

type Schemas = components['schemas'];

export function templateHandlers(ctx: MockContext) {
  const { router, state } = ctx;

  router.get('/v1/training/templates', 'listTemplates', ({ request, response }) => {
    const all = [...state.templates.values()].sort((a, b) => Number(b.builtin) - Number(a.builtin));
    const { page, ...paging } = pageOf(all, request.url);
    return response(200).json({ templates: page, ...paging });
  });

  router.post('/v1/training/templates', 'createTemplate', async ({ request, response }) => {
    const body = await request.json().catch(badJson);
    const key = idempotencyKeyOf(request, body);
    const earlier = replayed(ctx, 'createTemplate', key, body);
    if (earlier) return response(201).json(template(state, earlier.id));
    if (state.templates.has(body.name)) {
      throw new MockHttpError(409, 'conflict', `A template named ${body.name} exists.`, 'name');
    }
    const created: Schemas['Template'] = {
      name: body.name,
      description: body.description ?? '',
      builtin: false,
      config: body.config,
      created_at: now(),
    };
    state.templates.set(created.name, created);
    remember(ctx, 'createTemplate', key, body, { kind: 'template', id: created.name });
    return response(201).json(created);
  });

  router.get('/v1/training/templates/{template_name}', 'getTemplate', ({ params, response }) =>
    response(200).json(template(state, params.template_name)),
  );

  router.delete('/v1/training/templates/{template_name}', 'deleteTemplate', ({ params, response }) => {
    const found = template(state, params.template_name);
    if (found.builtin)
      throw new MockHttpError(409, 'conflict', `Template ${found.name} is built in.`, 'template_name');
    state.templates.delete(found.name);
    return response(200).json({ id: found.name, deleted: true });
  });
}

function template(state: MockState, name: string): Schemas['Template'] {
  const found = state.templates.get(name);
  if (!found) throw notFound('template', name, 'template_name');
  return found;
}
