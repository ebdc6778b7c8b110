import type { RequestBodyOf } from '../../core/types.js';
import type { components } from '../../generated/api.js';
import {
  badJson,
  idempotencyKeyOf,
  type MockContext,
  optionalJson,
  pageOf,
  remember,
  replayed,
} from '../context.js';
import { MockHttpError, notFound } from '../errors.js';
import { type MockState, newId, now } from '../state.js';
import { createTrainingJob, trainingJob } from './training.js';

type Schemas = components['schemas'];

const LOOPBACK_HOSTS = new Set(['localhost', '127.0.0.1', '[::1]', '::1']);

export function modelHandlers(ctx: MockContext) {
  const { router, state } = ctx;

  router.get('/v1/base-models', 'listBaseModels', ({ request, response }) => {
    const { page, ...paging } = pageOf([...state.baseModels.values()], request.url);
    return response(200).json({ models: page, ...paging });
  });

  router.post('/v1/base-models', 'createBaseModel', async ({ request, response }) => {
    const body = await request.json().catch(badJson);
    const key = idempotencyKeyOf(request, body);
    const earlier = replayed(ctx, 'createBaseModel', key, body);
    if (earlier) return response(201).json(state.baseModels.get(earlier.id)!);
    if ([...state.baseModels.values()].some((m) => m.name === body.name)) {
      throw new MockHttpError(409, 'conflict', `A base model named ${body.name} exists.`, 'name');
    }
    const created: Schemas['BaseModel'] = {
      id: newId(state, 'bm'),
      name: body.name,
      source: body.source,
      params: body.params ?? null,
      architecture: body.architecture ?? null,
      context_length: body.context_length ?? null,
      builtin: false,
      created_at: now(),
    };
    state.baseModels.set(created.id, created);
    remember(ctx, 'createBaseModel', key, body, { kind: 'baseModel', id: created.id });
    return response(201).json(created);
  });

  router.get('/v1/models', 'listModels', ({ request, response }) => {
    const { page, ...paging } = pageOf([...state.models.values()].reverse(), request.url);
    return response(200).json({ models: page, ...paging });
  });

  router.get('/v1/models/{model_id}', 'getModel', ({ params, response }) =>
    response(200).json(model(state, params.model_id)),
  );

  router.post('/v1/models/{model_id}/activate', 'activateModel', async ({ params, request, response }) => {
    const found = model(state, params.model_id);
    const body = await optionalJson<Schemas['ActivateModelRequest']>(request);
    for (const other of state.models.values()) other.active = false;
    found.active = true;
    if (body?.provider_model) found.provider_model = body.provider_model;
    return response(200).json({ ok: true, active_model: body?.provider_model ?? found.name, model: found });
  });

  router.post(
    '/v1/models/{model_id}/import-ollama',
    'importModelToOllama',
    async ({ params, request, response }) => {
      const found = model(state, params.model_id);
      const body = (await optionalJson<RequestBodyOf<'importModelToOllama'>>(request)) ?? {};
      if (body.base_model !== undefined) {
        throw new MockHttpError(
          400,
          'invalid_request',
          'base_model is not supported: Tunery imports whole-model GGUF files.',
          'base_model',
        );
      }
      const ollamaUrl = body.ollama_url ?? 'http://127.0.0.1:11434';
      let host: string;
      try {
        host = new URL(ollamaUrl).hostname;
      } catch {
        throw new MockHttpError(400, 'invalid_request', `${ollamaUrl} is not a URL.`, 'ollama_url');
      }
      if (!LOOPBACK_HOSTS.has(host)) {
        throw new MockHttpError(400, 'invalid_request', 'ollama_url must be a loopback host.', 'ollama_url');
      }
      if (!found.files.some((f) => f.name.endsWith('.gguf'))) {
        throw new MockHttpError(
          409,
          'conflict',
          `Model ${found.id} has no GGUF file; merge with export_gguf first.`,
        );
      }
      if (!state.ollamaReachable) {
        throw new MockHttpError(
          502,
          'ollama_unreachable',
          'Ollama did not complete the import.',
          'ollama_url',
        );
      }
      // As the server does: the name lives in the tenant's own Ollama namespace.
      const ollamaName = `tunery-${state.tenantId}/${body.model_name ?? found.name}`;
      const importedAt = now();
      found.ollama_name = ollamaName;
      found.imported_at = importedAt;
      return response(200).json({
        model: { id: found.id, ollama_name: ollamaName, imported_at: importedAt },
      });
    },
  );

  router.post('/v1/models/{model_id}/benchmark', 'benchmarkModel', async ({ params, request, response }) => {
    const found = model(state, params.model_id);
    const body = (await optionalJson<RequestBodyOf<'benchmarkModel'>>(request)) ?? {};
    const scope = `benchmarkModel/${found.id}` as const;
    const key = idempotencyKeyOf(request, body);
    const earlier = replayed(ctx, scope, key, body);
    const job = earlier
      ? trainingJob(state, earlier.id)
      : createTrainingJob(state, {
          type: 'benchmark',
          source_model_id: found.id,
          dataset_id: body.dataset_id,
          max_steps: Math.min(body.max_examples ?? 200, 10),
        });
    remember(ctx, scope, key, body, { kind: 'benchmark', id: job.id });
    const result = state.results.get(job.id);
    return response(202).json({
      model_id: found.id,
      job_id: job.id,
      status: job.status,
      scores: result?.scores ?? null,
      completed_at: job.completed_at ?? null,
    });
  });
}

function model(state: MockState, id: string): Schemas['Model'] {
  const found = state.models.get(id);
  if (!found) throw notFound('model', id, 'model_id');
  return found;
}
