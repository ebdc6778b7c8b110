import { describe, expect, it } from 'vitest';
import { NotFoundError } from '../../src/index.js';
import { useMockServer } from '../helpers.js';

const { client } = useMockServer();

describe('admin keys', () => {
  it('creates a key with its secret once, lists it without, and revokes it', async () => {
    const tunery = client();
    const created = await tunery.admin.keys.create({ tenant_id: 'acme', name: 'ci' });
    expect(created.secret.startsWith(created.key.prefix)).toBe(true);
    expect(created.key).toMatchObject({
      kind: 'user',
      tenant_id: 'acme',
      status: 'active',
      expires_at: null,
    });

    const page = await tunery.admin.keys.list({ tenant_id: 'acme' });
    expect(page.data.map((k) => k.id)).toEqual([created.key.id]);
    expect(JSON.stringify(page)).not.toContain(created.secret);

    expect(await tunery.admin.keys.revoke(created.key.id)).toMatchObject({ status: 'revoked' });
    expect((await tunery.admin.keys.list({ tenant_id: 'acme' })).data).toEqual([]);
    expect((await tunery.admin.keys.list({ include_inactive: true })).data[0]).toMatchObject({
      id: created.key.id,
      status: 'revoked',
    });
    await expect(tunery.admin.keys.revoke('key_nope')).rejects.toBeInstanceOf(NotFoundError);
  });
});
