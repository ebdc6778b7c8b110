import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runPrepared } from '../src/prepared.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

const KEYS_BY_KIND = {
  name: 'test_keys_by_kind',
  text: 'SELECT kind, count(*)::int AS n FROM api_keys WHERE kind = $1 GROUP BY kind',
};

describe.each(DATABASES)('prepared statements (%s)', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(() => server?.stop());

  it('answer the rows of their text with the values bound, on the pool and in a transaction', async () => {
    const { knex } = server.ctx;
    expect(await runPrepared(knex, KEYS_BY_KIND, ['worker'])).toEqual([{ kind: 'worker', n: 1 }]);
    // a second run of the same name (now only bound and executed) sees new rows
    await knex('api_keys').insert({
      ...(await knex('api_keys').where({ kind: 'worker' }).first()),
      id: 'key_second',
      hash: 'h2',
    });
    expect(await runPrepared(knex, KEYS_BY_KIND, ['worker'])).toEqual([{ kind: 'worker', n: 2 }]);
    await knex.transaction(async (trx) => {
      await trx('api_keys').where({ id: 'key_second' }).delete();
      // the transaction's own connection: its uncommitted delete is visible
      expect(await runPrepared(trx, KEYS_BY_KIND, ['worker'])).toEqual([{ kind: 'worker', n: 1 }]);
    });
  });

  it('are named statements of the connection that ran them', async () => {
    await server.ctx.knex.transaction(async (trx) => {
      await runPrepared(trx, KEYS_BY_KIND, ['user']);
      const named = await trx.raw('SELECT name FROM pg_prepared_statements WHERE name = ?', [
        KEYS_BY_KIND.name,
      ]);
      expect(named.rows).toEqual([{ name: KEYS_BY_KIND.name }]);
    });
  });
});
