import { createHash } from 'node:crypto';
import type { Request } from 'express';
import { badRequest } from '../errors.js';
import { type BodyOf, isoRequired, page, pathParam, type Routes, type Schemas, tenantOf } from '../http.js';
import {
  buildDatasetFromTrajectories,
  type DatasetRecord,
  type DatasetRow,
  getDataset,
  parseJsonl,
  removeDataset,
  storeDataset,
  toDatasetRow,
} from '../services/datasets.js';
import { idempotent } from '../services/idempotency.js';
import { listPage, newestFirst } from '../services/paging.js';

/** A dataset as the API shows it, with the seed aliases (`dataset_name`, `num_texts`, `example_count`). */
export function datasetView(row: DatasetRow): Schemas['Dataset'] {
  const unit = row.format === 'text' ? 'texts' : 'examples';
  return {
    id: row.id,
    name: row.name,
    dataset_name: row.name,
    format: row.format,
    num_examples: row.num_examples,
    num_texts: row.num_examples,
    example_count: row.num_examples,
    trajectory_count: row.trajectory_count,
    size_bytes: row.size_bytes,
    tokens_est: row.tokens_est,
    sha256: row.sha256,
    source: row.source,
    status: 'uploaded',
    message: `Training data uploaded successfully with ${row.num_examples} ${unit}`,
    created_at: isoRequired(row.created_at),
  };
}

const defaultName = (prefix: string) => `${prefix}-${new Date().toISOString().slice(0, 10)}`;

interface UploadedFile {
  fieldname: string;
  originalname: string;
  buffer: Buffer;
}

/** What a create request carries, whichever content type it came as. */
interface DatasetInput {
  name: string;
  records: DatasetRecord[] | object[];
  source: 'upload' | 'inline';
  param: string;
  /** What the idempotency key is bound to (a multipart body is hashed by its file's content). */
  fingerprint: unknown;
}

function readCreateRequest(req: Request): DatasetInput {
  const files = (req.files as UploadedFile[] | undefined) ?? [];
  if (req.is('multipart/form-data')) {
    const body = (req.body ?? {}) as { name?: string };
    const file = files.find((f) => f.fieldname === 'file');
    if (!file) throw badRequest('Attach the JSONL as the form field "file".', 'file');
    const records = parseJsonl(file.buffer.toString('utf8'), 'file');
    return {
      name: body.name || file.originalname || defaultName('dataset'),
      records,
      source: 'upload',
      param: 'file',
      fingerprint: {
        name: body.name ?? null,
        file_sha256: createHash('sha256').update(file.buffer).digest('hex'),
      },
    };
  }
  const body = req.body as BodyOf<'createDataset'>;
  const given = (['train_texts', 'records', 'jsonl'] as const).filter((k) => body[k] !== undefined);
  if (given.length !== 1) {
    throw badRequest(
      given.length === 0
        ? 'Give the data as one of train_texts, records or jsonl.'
        : `Give only one of train_texts, records or jsonl (got ${given.join(', ')}).`,
      given[1] ?? 'train_texts',
    );
  }
  const name = body.name ?? body.dataset_name ?? defaultName('dataset');
  if (body.train_texts) {
    return {
      name,
      records: body.train_texts.map((text) => ({ text })),
      source: 'inline',
      param: 'train_texts',
      fingerprint: body,
    };
  }
  if (body.records)
    return { name, records: body.records, source: 'inline', param: 'records', fingerprint: body };
  return {
    name,
    records: parseJsonl(body.jsonl!, 'jsonl'),
    source: 'upload',
    param: 'jsonl',
    fingerprint: body,
  };
}

export const datasetRoutes: Routes = {
  async createDataset(req, res, ctx) {
    const tenantId = tenantOf(req);
    const input = readCreateRequest(req);
    const { id } = await idempotent(
      ctx,
      req,
      'createDataset',
      'ds',
      async (datasetId) => {
        await storeDataset(ctx, tenantId, {
          id: datasetId,
          name: input.name,
          records: input.records,
          source: input.source,
          param: input.param,
        });
      },
      input.fingerprint,
    );
    res.status(201).json(datasetView(await getDataset(ctx, tenantId, id)) satisfies Schemas['Dataset']);
  },

  async listDatasets(req, res, ctx) {
    const tenantId = tenantOf(req);
    const body = await listPage(
      'datasets',
      ctx.knex('datasets').where({ tenant_id: tenantId }),
      page(req),
      newestFirst(),
      (rows) => rows.map((r) => datasetView(toDatasetRow(r))),
    );
    res.json(body satisfies Schemas['DatasetList']);
  },

  async getDataset(req, res, ctx) {
    const row = await getDataset(ctx, tenantOf(req), pathParam(req, 'dataset_id'));
    res.json(datasetView(row) satisfies Schemas['Dataset']);
  },

  async deleteDataset(req, res, ctx) {
    const id = pathParam(req, 'dataset_id');
    await removeDataset(ctx, tenantOf(req), id);
    res.json({ id, deleted: true } satisfies Schemas['Deleted']);
  },

  async buildDataset(req, res, ctx) {
    const tenantId = tenantOf(req);
    const body = (req.body ?? {}) as BodyOf<'buildDataset'>;
    const { id } = await idempotent(ctx, req, 'buildDataset', 'ds', async (datasetId) => {
      await buildDatasetFromTrajectories(ctx, tenantId, {
        id: datasetId,
        name: body.name,
        limit: body.limit ?? 100,
        minLlmCalls: body.min_llm_calls_per_trajectory ?? 1,
        source: body.source,
      });
    });
    res.status(201).json(datasetView(await getDataset(ctx, tenantId, id)) satisfies Schemas['Dataset']);
  },
};
