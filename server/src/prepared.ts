import type { Knex } from 'knex';

/**
 * A statement on a hot path (claim, complete, GET of a job, key lookup) that Postgres should plan
 * once per connection rather than on every call: the claim's plan alone costs about 1 ms. `text`
 * uses `$1…` placeholders; `name` must be unique to this text across the server.
 */
export interface PreparedStatement {
  name: string;
  text: string;
}

/** What knex's client exposes to run a statement on its own connection (not in knex's types). */
interface ConnectionClient {
  acquireConnection(): Promise<unknown>;
  releaseConnection(connection: unknown): Promise<unknown>;
}

interface QueryConnection {
  query(config: unknown, values?: unknown[]): Promise<{ rows: unknown[] }>;
}

/**
 * Runs `statement` with `values` on `db` (a knex instance or a transaction, whose connection it
 * then uses) and answers its rows, as a named statement: node-postgres parses it once per
 * connection and afterwards only binds and executes. On embedded PGlite too, whose one connection
 * node-postgres reaches through PGlite's adapter (db.ts): there, in WebAssembly, planning a claim
 * or a completion anew cost more than running it.
 */
export async function runPrepared<Row>(
  db: Knex | Knex.Transaction,
  statement: PreparedStatement,
  values: unknown[],
): Promise<Row[]> {
  const client = db.client as ConnectionClient;
  const connection = (await client.acquireConnection()) as QueryConnection;
  try {
    const result = await connection.query({ name: statement.name, text: statement.text, values });
    return result.rows as Row[];
  } finally {
    await client.releaseConnection(connection);
  }
}
