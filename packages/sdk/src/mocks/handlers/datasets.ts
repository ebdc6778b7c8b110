import type { RequestBodyOf } from '../../core/types.js';
import type { components } from '../../generated/api.js';
import {
  badJson,
  idempotencyKeyOf,
  type MockContext,
  newestFirst,
  optionalJson,
  pageOf,
  remember,
  replayed,
} from '../context.js';
import { MockHttpError, notFound } from '../errors.js';
import { storeFile } from '../files.js';
import { isTerminalStatus } from '../simulate.js';
import { type MockState, newId, now } from '../state.js';

type Schemas = components['schemas'];
type DatasetRecord = Schemas['DatasetRecord'];

export function datasetHandlers(ctx: MockContext) {
  const { router, state } = ctx;

  router.post('/v1/datasets', 'createDataset', async ({ request, response }) => {
    const isMultipart = request.headers.get('content-type')?.startsWith('multipart/form-data') ?? false;
    const { body, records, source } = isMultipart ? await fromMultipart(request) : await fromJson(request);
    const key = idempotencyKeyOf(request, body);
    const earlier = replayed(ctx, 'createDataset', key, body);
    if (earlier) return response(201).json(dataset(state, earlier.id));
    const created = storeDataset(state, { name: body.name ?? body.dataset_name, records, source });
    remember(ctx, 'createDataset', key, body, { kind: 'dataset', id: created.id });
    return response(201).json(created);
  });

  router.get('/v1/datasets', 'listDatasets', ({ request, response }) => {
    const { page, ...paging } = pageOf(newestFirst(state.datasets.values()), request.url);
    return response(200).json({ datasets: page, ...paging });
  });

  router.post('/v1/datasets/build', 'buildDataset', async ({ request, response }) => {
    const body = (await optionalJson<RequestBodyOf<'buildDataset'>>(request)) ?? {};
    const key = idempotencyKeyOf(request, body);
    const earlier = replayed(ctx, 'buildDataset', key, body);
    if (earlier) return response(201).json(dataset(state, earlier.id));
    const created = buildFromTrajectories(state, body);
    remember(ctx, 'buildDataset', key, body, { kind: 'dataset', id: created.id });
    return response(201).json(created);
  });

  router.get('/v1/datasets/{dataset_id}', 'getDataset', ({ params, response }) =>
    response(200).json(dataset(state, params.dataset_id)),
  );

  router.delete('/v1/datasets/{dataset_id}', 'deleteDataset', ({ params, response }) => {
    dataset(state, params.dataset_id);
    for (const job of state.trainingJobs.values()) {
      if (job.dataset_id === params.dataset_id && !isTerminalStatus(job.status)) {
        throw new MockHttpError(
          409,
          'conflict',
          `Dataset ${params.dataset_id} is used by ${job.status} job ${job.id}.`,
        );
      }
    }
    state.datasets.delete(params.dataset_id);
    const fileId = state.datasetFiles.get(params.dataset_id);
    if (fileId) state.files.delete(fileId);
    state.datasetFiles.delete(params.dataset_id);
    return response(200).json({ id: params.dataset_id, deleted: true });
  });
}

export function dataset(state: MockState, id: string): Schemas['Dataset'] {
  const found = state.datasets.get(id);
  if (!found) throw notFound('dataset', id, 'dataset_id');
  return found;
}

/** Stores records as a JSONL file and its Dataset row. */
export function storeDataset(
  state: MockState,
  {
    name,
    records,
    source,
    trajectoryCount,
  }: {
    name?: string | undefined;
    records: DatasetRecord[];
    source: Schemas['Dataset']['source'];
    trajectoryCount?: number;
  },
): Schemas['Dataset'] {
  const id = newId(state, 'ds');
  const jsonl = `${records.map((r) => JSON.stringify(r)).join('\n')}\n`;
  const file = storeFile(state, `${id}.jsonl`, jsonl);
  const datasetName = name ?? `dataset-${id.slice(-6)}`;
  const created: Schemas['Dataset'] = {
    id,
    name: datasetName,
    dataset_name: datasetName,
    format: formatOf(records[0]),
    num_examples: records.length,
    num_texts: records.length,
    example_count: records.length,
    trajectory_count: trajectoryCount ?? null,
    size_bytes: file.bytes.length,
    tokens_est: Math.ceil(file.bytes.length / 4),
    sha256: file.sha256,
    source,
    status: 'uploaded',
    message: `Stored ${records.length} examples.`,
    created_at: now(),
  };
  state.datasets.set(id, created);
  state.datasetFiles.set(id, file.id);
  return created;
}

function formatOf(record: DatasetRecord | undefined): Schemas['DatasetFormat'] {
  if (record && 'messages' in record) return 'chat';
  if (record && 'completion' in record) return 'prompt_completion';
  return 'text';
}

async function fromJson(request: Request) {
  const body = (await request.json().catch(badJson)) as Schemas['DatasetCreate'];
  const given = [body.train_texts, body.records, body.jsonl].filter((x) => x !== undefined).length;
  if (given !== 1)
    throw new MockHttpError(400, 'invalid_dataset', 'Give exactly one of train_texts, records, jsonl.');
  const records = body.train_texts
    ? body.train_texts.map((text) => ({ text }))
    : (body.records ?? parseJsonl(body.jsonl ?? ''));
  checkOneFormat(records);
  return { body, records, source: 'inline' as const };
}

async function fromMultipart(request: Request) {
  const form = await request.formData();
  const file = form.get('file');
  if (!file || typeof file === 'string')
    throw new MockHttpError(400, 'invalid_dataset', 'The form has no file part.', 'file');
  const text = await file.text();
  const fields = {
    name: (form.get('name') as string | null) ?? undefined,
    idempotency_key: (form.get('idempotency_key') as string | null) ?? undefined,
  };
  const records = parseJsonl(text);
  checkOneFormat(records);
  // The idempotency fingerprint covers the file's content, not just its name.
  const body = { ...fields, file: text };
  return {
    body: body as { name?: string; dataset_name?: string; idempotency_key?: string },
    records,
    source: 'upload' as const,
  };
}

/** Parses and checks JSONL as the server does: a bad line is 400 invalid_dataset naming the line. */
export function parseJsonl(text: string): DatasetRecord[] {
  const records: DatasetRecord[] = [];
  text.split('\n').forEach((line, index) => {
    if (!line.trim()) return;
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch {
      throw new MockHttpError(400, 'invalid_dataset', `Line ${index + 1} is not valid JSON.`, 'file');
    }
    if (!isRecord(value)) {
      throw new MockHttpError(
        400,
        'invalid_dataset',
        `Line ${index + 1} is not {"text"}, {"prompt", "completion"} or {"messages"}.`,
        'file',
      );
    }
    records.push(value);
  });
  if (records.length === 0)
    throw new MockHttpError(400, 'invalid_dataset', 'The dataset has no records.', 'file');
  return records;
}

function isRecord(value: unknown): value is DatasetRecord {
  if (!value || typeof value !== 'object') return false;
  const v = value as Record<string, unknown>;
  if (typeof v.text === 'string' && v.text.length > 0) return true;
  if (typeof v.prompt === 'string' && typeof v.completion === 'string' && v.completion.length > 0)
    return true;
  return Array.isArray(v.messages) && v.messages.length > 0;
}

function checkOneFormat(records: DatasetRecord[]) {
  const first = formatOf(records[0]);
  const other = records.findIndex((r) => formatOf(r) !== first);
  if (other >= 0) {
    throw new MockHttpError(
      400,
      'invalid_dataset',
      `Record ${other + 1} is not in the ${first} format of record 1.`,
      'records',
    );
  }
}

function buildFromTrajectories(state: MockState, body: RequestBodyOf<'buildDataset'>): Schemas['Dataset'] {
  const minCalls = body.min_llm_calls_per_trajectory ?? 1;
  const chosen = newestFirst(state.trajectories.values())
    .filter((t) => (!body.source || t.source === body.source) && t.llm_call_count >= minCalls)
    .slice(0, body.limit ?? 100);
  const records: DatasetRecord[] = chosen.flatMap((t) =>
    t.llm_calls.map((call) => ({
      messages: [
        ...(call.messages ?? [
          ...(call.system_prompt ? [{ role: 'system' as const, content: call.system_prompt }] : []),
          { role: 'user' as const, content: call.user_prompt ?? '' },
        ]),
        { role: 'assistant' as const, content: call.response ?? '' },
      ],
    })),
  );
  if (records.length === 0)
    throw new MockHttpError(400, 'invalid_dataset', 'No trajectory qualifies for the dataset.');
  return storeDataset(state, {
    name: body.name,
    records,
    source: 'trajectories',
    trajectoryCount: chosen.length,
  });
}
