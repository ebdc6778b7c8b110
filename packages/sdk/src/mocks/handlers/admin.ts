import type { components } from '../../generated/api.js';
import { badJson, type MockContext, newestFirst, pageOf } from '../context.js';
import { MockHttpError, notFound } from '../errors.js';
import { newId, now } from '../state.js';

type Schemas = components['schemas'];

/** The admin keys API; the mock's caller is the operator (it manages every tenant's keys). */
export function adminHandlers({ router, state }: MockContext) {
  router.get('/v1/admin/keys', 'listApiKeys', ({ request, response }) => {
    const query = new URL(request.url).searchParams;
    const tenantId = query.get('tenant_id');
    const kind = query.get('kind');
    const all = query.get('include_inactive') === 'true';
    const keys = newestFirst(state.apiKeys.values()).filter(
      (k) =>
        (tenantId === null || k.tenant_id === tenantId) &&
        (kind === null || k.kind === kind) &&
        (all || statusOf(k) === 'active'),
    );
    const { page, ...paging } = pageOf(keys.map(withStatus), request.url);
    return response(200).json({ keys: page, ...paging });
  });

  router.post('/v1/admin/keys', 'createApiKey', async ({ request, response }) => {
    const body = (await request.json().catch(badJson)) as Schemas['ApiKeyCreate'];
    const kind = body.kind ?? 'user';
    if (kind === 'worker' && body.tenant_id !== undefined) {
      throw new MockHttpError(400, 'invalid_request', 'Worker tokens belong to no tenant.', 'tenant_id');
    }
    if (body.expires_at !== undefined && Date.parse(body.expires_at) <= Date.now()) {
      throw new MockHttpError(400, 'invalid_request', 'expires_at must be in the future.', 'expires_at');
    }
    const secret = `${kind === 'user' ? 'tk' : 'tw'}_${newId(state, 'mock').slice(5)}`;
    const key: Schemas['ApiKey'] = {
      id: newId(state, 'key'),
      kind,
      tenant_id: kind === 'user' ? (body.tenant_id ?? state.tenantId) : null,
      admin: kind === 'user' && Boolean(body.admin),
      name: body.name ?? null,
      prefix: secret.slice(0, 7),
      status: 'active',
      created_at: now(),
      expires_at: body.expires_at ? new Date(body.expires_at).toISOString() : null,
      revoked_at: null,
    };
    state.apiKeys.set(key.id, key);
    return response(201).json({ key, secret });
  });

  router.post('/v1/admin/keys/{key_id}/revoke', 'revokeApiKey', ({ params, response }) => {
    const key = state.apiKeys.get(params.key_id);
    if (!key) throw notFound('API key', params.key_id, 'key_id', 'key_not_found');
    key.revoked_at ??= now();
    return response(200).json(withStatus(key));
  });
}

function statusOf(key: Schemas['ApiKey']): Schemas['ApiKey']['status'] {
  if (key.revoked_at) return 'revoked';
  if (key.expires_at && Date.parse(key.expires_at) <= Date.now()) return 'expired';
  return 'active';
}

const withStatus = (key: Schemas['ApiKey']): Schemas['ApiKey'] => ({ ...key, status: statusOf(key) });
