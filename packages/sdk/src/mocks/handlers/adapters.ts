import type { components } from '../../generated/api.js';
import { type MockContext, newestFirst, pageOf } from '../context.js';
import { MockHttpError, notFound } from '../errors.js';
import type { MockState } from '../state.js';

type Schemas = components['schemas'];

export function adapterHandlers(ctx: MockContext) {
  const { router, state } = ctx;

  router.get('/v1/adapters', 'listAdapters', ({ request, response }) => {
    const { page, ...paging } = pageOf(newestFirst(state.adapters.values()), request.url);
    return response(200).json({
      adapters: page,
      ...paging,
      current_adapter: loadedAdapter(state)?.name ?? null,
    });
  });

  router.post('/v1/adapters/unload', 'unloadAdapter', ({ response }) => {
    const loaded = loadedAdapter(state);
    if (!loaded) throw new MockHttpError(400, 'no_adapter_loaded', 'No adapter is loaded.');
    loaded.is_loaded = false;
    loaded.loaded_on = [];
    return response(200).json({
      adapter_name: loaded.name,
      status: 'unloaded',
      message: `Unloaded ${loaded.name}.`,
    });
  });

  router.get('/v1/adapters/{adapter_name}', 'getAdapter', ({ params, response }) =>
    response(200).json(adapter(state, params.adapter_name)),
  );

  router.delete('/v1/adapters/{adapter_name}', 'deleteAdapter', ({ params, response }) => {
    const found = adapter(state, params.adapter_name);
    state.adapters.delete(found.name);
    return response(200).json({
      adapter_name: found.name,
      status: 'deleted',
      message: `Deleted ${found.name}.`,
    });
  });

  router.post('/v1/adapters/{adapter_name}/load', 'loadAdapter', ({ params, response }) => {
    const found = adapter(state, params.adapter_name);
    for (const other of state.adapters.values()) {
      other.is_loaded = false;
      other.loaded_on = [];
    }
    // The mock plays one serving worker that holds what is loaded.
    found.is_loaded = true;
    found.loaded_on = [MOCK_SERVING_WORKER];
    return response(200).json({
      adapter_name: found.name,
      status: 'loaded',
      message: `Adapter ${found.name} loaded on serving worker ${MOCK_SERVING_WORKER}`,
    });
  });
}

const MOCK_SERVING_WORKER = 'mock-serving-worker';

function adapter(state: MockState, name: string): Schemas['Adapter'] {
  const found = state.adapters.get(name);
  if (!found) throw notFound('adapter', name, 'adapter_name');
  return found;
}

function loadedAdapter(state: MockState): Schemas['Adapter'] | undefined {
  return [...state.adapters.values()].find((a) => a.is_loaded);
}
