import type { Knex } from 'knex';
import type { AppContext } from '../context.js';
import { ApiError, notFound } from '../errors.js';
import { newId } from '../ids.js';
import type { PartWriter, StoredObject } from '../storage.js';
import { forgetIdempotentCreates } from './idempotency.js';

/** `text` | `prompt_completion` | `chat`: one format per dataset (Alpaca and ShareGPT rows become chat). */
export type DatasetFormat = 'text' | 'prompt_completion' | 'chat';
export type DatasetSource = 'upload' | 'inline' | 'trajectories';

export type TextRecord = { text: string };
export type PromptCompletionRecord = { prompt: string; completion: string };
export type ChatRecord = { messages: { role: string; content: string }[] };
export type DatasetRecord = TextRecord | PromptCompletionRecord | ChatRecord;

/** One row of `datasets`, with its bigint columns as numbers. */
export interface DatasetRow {
  id: string;
  tenant_id: string;
  name: string;
  format: DatasetFormat;
  num_examples: number;
  size_bytes: number;
  tokens_est: number;
  sha256: string;
  source: DatasetSource;
  trajectory_count: number | null;
  file_id: string;
  created_at: Date;
}

export interface StoreDatasetInput {
  /** The dataset id to use (an idempotent create reserves it first); a new one otherwise. */
  id?: string;
  name: string;
  records: object[];
  source: DatasetSource;
  trajectoryCount?: number;
  /** The request field the records came from, named by validation errors (default `records`). */
  param?: string;
}

/** The name of the stored JSONL inside the dataset's folder (and of its `files` row). */
export const DATASET_FILE_NAME = 'data.jsonl';

const CHAT_ROLES = new Set(['system', 'user', 'assistant', 'tool']);

/** Tokens are estimated at ≈4 bytes of UTF-8 each, the usual rule of thumb for BPE vocabularies. */
export const estimateTokens = (bytes: number): number => Math.ceil(bytes / 4);

const invalidDataset = (message: string, param: string | null) =>
  new ApiError(400, 'invalid_dataset', message, param);

const isPlainObject = (value: unknown): value is Record<string, unknown> =>
  typeof value === 'object' && value !== null && !Array.isArray(value);

/**
 * The shape a record has, from its keys; null when it has none. Alpaca and ShareGPT rows are
 * converted to chat (what the worker trains on), so they never become a dataset's format.
 */
function shapeOf(record: Record<string, unknown>): DatasetFormat | 'alpaca' | 'sharegpt' | null {
  if ('messages' in record) return 'chat';
  if ('conversations' in record) return 'sharegpt';
  // before `text`: Alpaca exports often carry the rendered prompt as a `text` column too
  if ('instruction' in record) return 'alpaca';
  if ('prompt' in record || 'completion' in record) return 'prompt_completion';
  if ('text' in record) return 'text';
  return null;
}

/** Alpaca's `instruction` (+ `input`) is the user turn and its `output` the assistant turn. */
function alpacaToChat(record: Record<string, unknown>): Record<string, unknown> {
  const { instruction, input, output } = record;
  if (typeof instruction !== 'string' || instruction.length === 0)
    throw new Error('"instruction" must be a non-empty string');
  if (input !== undefined && typeof input !== 'string') throw new Error('"input" must be a string');
  if (typeof output !== 'string' || output.length === 0)
    throw new Error('"output" must be a non-empty string');
  const user = input ? `${instruction}\n\n${input}` : instruction;
  return {
    messages: [
      { role: 'user', content: user },
      { role: 'assistant', content: output },
    ],
  };
}

const SHAREGPT_ROLES: Record<string, string> = { human: 'user', gpt: 'assistant', system: 'system' };

/** ShareGPT's `conversations: [{from, value}]` as chat messages (human → user, gpt → assistant). */
function sharegptToChat(record: Record<string, unknown>): Record<string, unknown> {
  const turns = record.conversations;
  if (!Array.isArray(turns) || turns.length === 0)
    throw new Error('"conversations" must be a non-empty array');
  const messages = turns.map((turn, i) => {
    if (!isPlainObject(turn)) throw new Error(`conversations[${i}] must be an object`);
    const role = typeof turn.from === 'string' ? SHAREGPT_ROLES[turn.from] : undefined;
    if (!role) throw new Error(`conversations[${i}].from must be one of human, gpt, system`);
    if (typeof turn.value !== 'string') throw new Error(`conversations[${i}].value must be a string`);
    return { role, content: turn.value };
  });
  if (!messages.some((m) => m.role === 'assistant' && m.content.length > 0))
    throw new Error('a ShareGPT record needs at least one non-empty gpt turn to train on');
  return { messages };
}

/**
 * Checks one record against its format and returns it with only that format's fields (extra
 * fields such as an `id` column of a JSONL export are dropped). Throws a message without location;
 * the caller prefixes it with `line N` or `record N`.
 */
function normalizeRecord(
  record: unknown,
  format: DatasetFormat | null,
): { format: DatasetFormat; record: DatasetRecord } {
  if (!isPlainObject(record)) throw new Error('each record must be a JSON object');
  const shape = shapeOf(record);
  if (!shape)
    throw new Error(
      'expected {"text"}, {"prompt", "completion"}, {"messages": [...]}, Alpaca {"instruction", "output"} ' +
        'or ShareGPT {"conversations": [...]}',
    );
  if (shape === 'alpaca') return normalizeRecord(alpacaToChat(record), format);
  if (shape === 'sharegpt') return normalizeRecord(sharegptToChat(record), format);
  const own = shape;
  if (format && own !== format) throw new Error(`format ${own} differs from the dataset's format ${format}`);
  if (own === 'text') {
    if (typeof record.text !== 'string' || record.text.length === 0)
      throw new Error('"text" must be a non-empty string');
    return { format: own, record: { text: record.text } };
  }
  if (own === 'prompt_completion') {
    if (typeof record.prompt !== 'string') throw new Error('"prompt" must be a string');
    if (typeof record.completion !== 'string' || record.completion.length === 0)
      throw new Error('"completion" must be a non-empty string');
    return { format: own, record: { prompt: record.prompt, completion: record.completion } };
  }
  const messages = record.messages;
  if (!Array.isArray(messages) || messages.length === 0)
    throw new Error('"messages" must be a non-empty array');
  const clean: ChatRecord['messages'] = [];
  messages.forEach((message, i) => {
    if (!isPlainObject(message)) throw new Error(`messages[${i}] must be an object`);
    if (typeof message.role !== 'string' || !CHAT_ROLES.has(message.role))
      throw new Error(`messages[${i}].role must be one of system, user, assistant, tool`);
    if (typeof message.content !== 'string') throw new Error(`messages[${i}].content must be a string`);
    clean.push({ role: message.role, content: message.content });
  });
  if (!clean.some((m) => m.role === 'assistant' && m.content.length > 0))
    throw new Error('a chat record needs at least one non-empty assistant turn to train on');
  return { format: own, record: { messages: clean } };
}

/**
 * Validates every record (one format for all) and returns the format and the normalized records.
 * `label(i)` names record i in messages, e.g. `line 3` or `record 3`.
 */
export function validateRecords(
  records: unknown[],
  param: string | null,
  label: (index: number) => string = (i) => `record ${i + 1}`,
): { format: DatasetFormat; records: DatasetRecord[] } {
  if (records.length === 0) throw invalidDataset('The dataset has no records.', param);
  let format: DatasetFormat | null = null;
  const out: DatasetRecord[] = [];
  records.forEach((raw, i) => {
    try {
      const normalized = normalizeRecord(raw, format);
      format = normalized.format;
      out.push(normalized.record);
    } catch (err) {
      throw invalidDataset(`${label(i)}: ${(err as Error).message}.`, param);
    }
  });
  return { format: format!, records: out };
}

/**
 * Parses JSONL text into validated records. Blank lines are skipped; any other line must be one
 * record. A bad line is `400 invalid_dataset` whose message names it (`line 3: …`) and whose param
 * is `param` (`jsonl`, or `dataset_path` for a file the server reads).
 */
export function parseJsonl(text: string, param = 'jsonl'): DatasetRecord[] {
  const parsed: unknown[] = [];
  const lineNumbers: number[] = [];
  const lines = text.replace(/^\uFEFF/, '').split(/\r?\n/);
  lines.forEach((line, i) => {
    if (line.trim() === '') return;
    parsed.push(parseJsonlLine(line, i + 1, param));
    lineNumbers.push(i + 1);
  });
  if (parsed.length === 0) throw invalidDataset('The JSONL has no records.', param);
  return validateRecords(parsed, param, (index) => `line ${lineNumbers[index]}`).records;
}

function parseJsonlLine(line: string, lineNumber: number, param: string): unknown {
  try {
    return JSON.parse(line);
  } catch (err) {
    throw invalidDataset(`line ${lineNumber}: not valid JSON (${(err as Error).message}).`, param);
  }
}

/**
 * The longest JSONL line a streamed upload may have. Records are parsed one line at a time, so
 * this (not the file's size) bounds the memory an upload takes.
 */
export const MAX_JSONL_LINE_BYTES = 8 * 1024 * 1024;

/** The lines of a byte stream (`\n` or `\r\n`), numbered from 1, each at most `maxBytes`. */
export async function* jsonlLines(
  source: AsyncIterable<Buffer>,
  param: string,
  maxBytes = MAX_JSONL_LINE_BYTES,
): AsyncGenerator<{ line: string; lineNumber: number }> {
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  let lineNumber = 0;
  const take = (tail: Buffer) => {
    const bytes = Buffer.concat([...pending, tail]);
    pending = [];
    pendingBytes = 0;
    lineNumber += 1;
    const text = bytes.toString('utf8');
    return { line: lineNumber === 1 ? text.replace(/^\uFEFF/, '') : text, lineNumber };
  };
  const tooLong = () => invalidDataset(`line ${lineNumber + 1}: longer than ${maxBytes} bytes.`, param);
  for await (const chunk of source) {
    let start = 0;
    for (let nl = chunk.indexOf(10); nl !== -1; nl = chunk.indexOf(10, start)) {
      if (pendingBytes + nl - start > maxBytes) throw tooLong();
      yield take(chunk.subarray(start, nl));
      start = nl + 1;
    }
    if (start < chunk.length) {
      pendingBytes += chunk.length - start;
      if (pendingBytes > maxBytes) throw tooLong();
      pending.push(chunk.subarray(start));
    }
  }
  if (pendingBytes > 0) yield take(Buffer.alloc(0));
}

/**
 * Validates records one at a time (one format for all) and writes them, normalized, as JSONL to a
 * part file. Memory stays at one record plus a small write buffer, whatever the dataset's size.
 */
class DatasetFileWriter {
  format: DatasetFormat | null = null;
  count = 0;
  private buffered: string[] = [];
  private bufferedBytes = 0;

  constructor(
    readonly part: PartWriter,
    private readonly param: string,
  ) {}

  async add(raw: unknown, label: string): Promise<void> {
    let normalized: { format: DatasetFormat; record: DatasetRecord };
    try {
      normalized = normalizeRecord(raw, this.format);
    } catch (err) {
      throw invalidDataset(`${label}: ${(err as Error).message}.`, this.param);
    }
    this.format = normalized.format;
    this.count += 1;
    const line = `${JSON.stringify(normalized.record)}\n`;
    this.buffered.push(line);
    this.bufferedBytes += line.length;
    if (this.bufferedBytes >= 256 * 1024) await this.flush();
  }

  /** Flushes and fsyncs the part; `400 invalid_dataset` when no record came. */
  async finish(): Promise<PreparedDataset> {
    if (this.count === 0) throw invalidDataset('The dataset has no records.', this.param);
    await this.flush();
    const stored = await this.part.finish();
    return { format: this.format!, numExamples: this.count, stored, part: this.part };
  }

  private async flush(): Promise<void> {
    if (this.buffered.length === 0) return;
    const data = Buffer.from(this.buffered.join(''));
    this.buffered = [];
    this.bufferedBytes = 0;
    await this.part.write(data);
  }
}

/** A dataset's validated file, durable on disk as a part, not yet recorded or in place. */
export interface PreparedDataset {
  format: DatasetFormat;
  numExamples: number;
  stored: StoredObject;
  part: PartWriter;
}

/** Runs `fill` on a new dataset file for dataset `id`; the part is removed if it fails. */
async function writeDatasetFile(
  ctx: Pick<AppContext, 'storage'>,
  id: string,
  param: string,
  fill: (file: DatasetFileWriter) => Promise<void>,
): Promise<PreparedDataset> {
  const file = new DatasetFileWriter(await ctx.storage.openPart(['datasets', id, DATASET_FILE_NAME]), param);
  try {
    await fill(file);
    return await file.finish();
  } catch (err) {
    await file.part.discard();
    throw err;
  }
}

/**
 * Streams a JSONL upload into dataset `id`'s file, validating line by line (blank lines skipped, a
 * bad line is `400 invalid_dataset` naming it). Memory is bounded by MAX_JSONL_LINE_BYTES.
 */
export function prepareJsonlDataset(
  ctx: Pick<AppContext, 'storage'>,
  id: string,
  source: AsyncIterable<Buffer>,
  param: string,
  /** A further check of each parsed line (it throws a message without location). */
  checkLine?: (record: unknown) => void,
): Promise<PreparedDataset> {
  return writeDatasetFile(ctx, id, param, async (file) => {
    for await (const { line, lineNumber } of jsonlLines(source, param)) {
      if (line.trim() === '') continue;
      const record = parseJsonlLine(line, lineNumber, param);
      try {
        checkLine?.(record);
      } catch (err) {
        throw invalidDataset(`line ${lineNumber}: ${(err as Error).message}.`, param);
      }
      await file.add(record, `line ${lineNumber}`);
    }
  });
}

/** Writes records already in memory into dataset `id`'s file, validating each. */
export function prepareDataset(
  ctx: Pick<AppContext, 'storage'>,
  id: string,
  records: unknown[],
  param: string,
): Promise<PreparedDataset> {
  return writeDatasetFile(ctx, id, param, async (file) => {
    for (const [i, record] of records.entries()) await file.add(record, `record ${i + 1}`);
  });
}

/** Normalizes a `datasets` row as the drivers return it (bigint columns come back as strings). */
export function toDatasetRow(row: Record<string, unknown>): DatasetRow {
  return {
    ...(row as unknown as DatasetRow),
    num_examples: Number(row.num_examples),
    size_bytes: Number(row.size_bytes),
    tokens_est: Number(row.tokens_est),
    trajectory_count: row.trajectory_count == null ? null : Number(row.trajectory_count),
  };
}

export interface DatasetMeta {
  name: string;
  source: DatasetSource;
  trajectoryCount?: number;
}

/**
 * Records a prepared dataset (its `files` and `datasets` rows, in one transaction) and only then
 * moves its file into place: a row never names a file that is not whole, and a crash in between
 * leaves a part the sweeper finishes (see `LocalStorage.sweepParts`). Inside a caller's
 * transaction (`db`), the move waits for that transaction: the caller wraps it in
 * `removingOnFailure`, which moves the file once it has committed.
 */
export async function recordDataset(
  ctx: AppContext,
  tenantId: string,
  id: string,
  prepared: PreparedDataset,
  meta: DatasetMeta,
  db: Knex | Knex.Transaction = ctx.knex,
): Promise<DatasetRow> {
  const { stored } = prepared;
  const fileId = newId('file');
  const write = async (trx: Knex | Knex.Transaction) => {
    await trx('files').insert({
      id: fileId,
      tenant_id: tenantId,
      owner_kind: 'dataset',
      owner_id: id,
      name: DATASET_FILE_NAME,
      rel_path: stored.relPath,
      size_bytes: stored.sizeBytes,
      sha256: stored.sha256,
    });
    const [row] = await trx('datasets')
      .insert({
        id,
        tenant_id: tenantId,
        name: meta.name,
        format: prepared.format,
        num_examples: prepared.numExamples,
        size_bytes: stored.sizeBytes,
        tokens_est: estimateTokens(stored.sizeBytes),
        sha256: stored.sha256,
        source: meta.source,
        trajectory_count: meta.trajectoryCount ?? null,
        file_id: fileId,
      })
      .returning('*');
    return toDatasetRow(row as Record<string, unknown>);
  };
  if (db.isTransaction) {
    try {
      const row = await write(db);
      ctx.storage.deferCommit(prepared.part);
      return row;
    } catch (err) {
      await prepared.part.discard();
      throw err;
    }
  }
  let row: DatasetRow;
  try {
    row = await db.transaction(write);
  } catch (err) {
    await prepared.part.discard();
    throw err;
  }
  await prepared.part.commit();
  return row;
}

/**
 * Validates records, writes them as JSONL to `datasets/<id>/data.jsonl`, and records the `files`
 * and `datasets` rows (see `recordDataset`).
 */
export async function storeDataset(
  ctx: AppContext,
  tenantId: string,
  input: StoreDatasetInput,
  db: Knex | Knex.Transaction = ctx.knex,
): Promise<DatasetRow> {
  const id = input.id ?? newId('ds');
  const prepared = await prepareDataset(ctx, id, input.records, input.param ?? 'records');
  return recordDataset(ctx, tenantId, id, prepared, input, db);
}

/** The tenant's dataset, or `404 not_found` (another tenant's dataset does not exist for you). */
export async function getDataset(
  ctx: Pick<AppContext, 'knex'>,
  tenantId: string,
  id: string,
  db: Knex | Knex.Transaction = ctx.knex,
): Promise<DatasetRow> {
  const row = await db('datasets').where({ tenant_id: tenantId, id }).first();
  if (!row) throw notFound('dataset', id, 'dataset_id');
  return toDatasetRow(row);
}

/**
 * The tenant's most recently created dataset: what a training job without data trains on (seed
 * 004: "uses latest if omitted"). `400 no_dataset` when the tenant has none.
 */
export async function latestDataset(ctx: Pick<AppContext, 'knex'>, tenantId: string): Promise<DatasetRow> {
  const row = await ctx
    .knex('datasets')
    .where({ tenant_id: tenantId })
    .orderBy([
      { column: 'created_at', order: 'desc' },
      { column: 'id', order: 'desc' },
    ])
    .first();
  if (!row) {
    throw new ApiError(
      400,
      'no_dataset',
      'No dataset to train on: give dataset_id, dataset_path or train_texts, or create a dataset first (POST /v1/datasets).',
      'dataset_id',
    );
  }
  return toDatasetRow(row);
}

// ------------------------------------------------------------------ datasets from trajectories

/** One recorded LLM call (the spec's LlmCall). */
interface LlmCall {
  system_prompt?: string;
  user_prompt?: string;
  messages?: { role: string; content: string }[];
  response?: string;
}

/**
 * One LLM call as a chat example: its system prompt, its input conversation (or its user prompt),
 * then its response as the assistant turn. Calls without a response teach nothing and give null.
 */
export function llmCallToExample(call: LlmCall): ChatRecord | null {
  if (typeof call.response !== 'string' || call.response.length === 0) return null;
  const messages: ChatRecord['messages'] = [];
  const input = Array.isArray(call.messages) ? call.messages : [];
  if (call.system_prompt && !input.some((m) => m.role === 'system')) {
    messages.push({ role: 'system', content: call.system_prompt });
  }
  for (const m of input) messages.push({ role: m.role, content: m.content });
  if (input.length === 0 && call.user_prompt) messages.push({ role: 'user', content: call.user_prompt });
  if (!messages.some((m) => m.role === 'user')) return null;
  messages.push({ role: 'assistant', content: call.response });
  return { messages };
}

export interface BuildFromTrajectoriesInput {
  id?: string;
  name?: string;
  /** Most trajectories to include, newest first. */
  limit: number;
  /** Skip trajectories with fewer LLM calls. */
  minLlmCalls: number;
  /** Only trajectories recorded from this source. */
  source?: string;
  /** Only trajectories recorded after this moment (auto-training's "new since the last run"). */
  since?: Date | null;
}

/**
 * Builds a chat dataset from the tenant's trajectories, newest first: every LLM call with a
 * response becomes one `messages` example. `400 invalid_dataset` when no trajectory qualifies.
 */
export async function buildDatasetFromTrajectories(
  ctx: AppContext,
  tenantId: string,
  input: BuildFromTrajectoriesInput,
  db: Knex | Knex.Transaction = ctx.knex,
): Promise<DatasetRow> {
  const query = db('trajectories')
    .where({ tenant_id: tenantId })
    .andWhere('llm_call_count', '>=', input.minLlmCalls)
    .orderBy([
      { column: 'created_at', order: 'desc' },
      { column: 'id', order: 'desc' },
    ])
    .limit(input.limit)
    .select('id', 'llm_calls');
  if (input.source !== undefined) query.andWhere('source', input.source);
  if (input.since) query.andWhere('created_at', '>', input.since);
  const trajectories = await query;

  const records: ChatRecord[] = [];
  let used = 0;
  for (const trajectory of trajectories) {
    const calls = (
      typeof trajectory.llm_calls === 'string' ? JSON.parse(trajectory.llm_calls) : trajectory.llm_calls
    ) as LlmCall[];
    const examples = calls.map(llmCallToExample).filter((e): e is ChatRecord => e !== null);
    if (examples.length > 0) used += 1;
    records.push(...examples);
  }
  if (records.length === 0) {
    throw invalidDataset(
      trajectories.length === 0
        ? `No trajectory qualifies (at least ${input.minLlmCalls} LLM call(s)${input.source !== undefined ? `, source "${input.source}"` : ''}).`
        : 'No LLM call of the matching trajectories has both an input and a response to train on.',
      null,
    );
  }
  return storeDataset(
    ctx,
    tenantId,
    {
      id: input.id,
      name: input.name ?? `trajectories-${new Date().toISOString().slice(0, 10)}`,
      records,
      source: 'trajectories',
      trajectoryCount: used,
    },
    db,
  );
}

/**
 * Deletes a dataset's rows and then its file. `409 conflict` while a pending or running job uses
 * it; `404` when the tenant has no such dataset.
 */
export async function removeDataset(ctx: AppContext, tenantId: string, id: string): Promise<void> {
  await ctx.knex.transaction(async (trx) => {
    await getDataset(ctx, tenantId, id, trx);
    const user = await trx('jobs')
      .where({ tenant_id: tenantId, dataset_id: id })
      .whereIn('status', ['pending', 'running'])
      .first('id');
    if (user)
      throw new ApiError(409, 'conflict', `Dataset ${id} is used by job ${user.id}, which has not finished.`);
    await trx('files').where({ tenant_id: tenantId, owner_kind: 'dataset', owner_id: id }).delete();
    await trx('datasets').where({ tenant_id: tenantId, id }).delete();
    // A create repeated with the same idempotency key now makes a new dataset (not a 404).
    await forgetIdempotentCreates(trx, tenantId, id);
  });
  // Bytes go after the rows: a crash in between leaves an orphan file, never a dangling row.
  await ctx.storage.removeTree(['datasets', id]);
}
