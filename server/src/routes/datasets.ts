import type { Request } from 'express';
import type { AppContext } from '../context.js';
import { ApiError, badRequest } from '../errors.js';
import { type BodyOf, isoRequired, page, pathParam, type Routes, type Schemas, tenantOf } from '../http.js';
import { type DatasetUploadFile, UPLOAD_FIELD } from '../services/dataset-upload.js';
import {
  buildDatasetFromTrajectories,
  type DatasetRow,
  getDataset,
  parseJsonl,
  recordDataset,
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

/**
 * A multipart create (also the OpenAI-compatible upload's): the file was streamed to disk and
 * validated before the handler runs.
 */
export async function createFromUpload(req: Request, ctx: AppContext): Promise<string> {
  const tenantId = tenantOf(req);
  const files = (req.files as DatasetUploadFile[] | undefined) ?? [];
  const body = (req.body ?? {}) as { name?: string };
  const refused = files.find((f) => f.refusal);
  if (refused) throw refused.refusal!;
  const file = files.find((f) => f.fieldname === UPLOAD_FIELD && f.upload);
  if (!file?.upload) throw badRequest(`Attach the JSONL as the form field "${UPLOAD_FIELD}".`, UPLOAD_FIELD);
  const upload = file.upload;
  upload.claimed = true;
  // the request ended (and took the file with it) before this handler ran
  if (upload.prepared.part.isDiscarded)
    throw new ApiError(400, 'upload_interrupted', 'The request ended before the upload was recorded.');
  let recorded = false;
  try {
    const { id } = await idempotent(
      ctx,
      req,
      'createDataset',
      { id: upload.datasetId },
      async (datasetId) => {
        recorded = true;
        await recordDataset(ctx, tenantId, datasetId, upload.prepared, {
          name: body.name || file.originalname || defaultName('dataset'),
          source: 'upload',
        });
      },
      { name: body.name ?? null, file_sha256: upload.rawSha256 },
    );
    return id;
  } finally {
    // a repeat of an idempotent create (or a refused one) keeps the first dataset; this copy goes
    if (!recorded) await upload.prepared.part.discard();
  }
}

/** A JSON create: inline `train_texts`, `records` or `jsonl` text. */
async function createFromJson(req: Request, ctx: AppContext): Promise<string> {
  const tenantId = tenantOf(req);
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
  const param = given[0]!;
  const records =
    param === 'train_texts'
      ? body.train_texts!.map((text) => ({ text }))
      : param === 'records'
        ? body.records!
        : parseJsonl(body.jsonl!, 'jsonl');
  const { id } = await idempotent(ctx, req, 'createDataset', 'ds', async (datasetId) => {
    await storeDataset(ctx, tenantId, {
      id: datasetId,
      name: body.name ?? body.dataset_name ?? defaultName('dataset'),
      records,
      source: param === 'records' || param === 'train_texts' ? 'inline' : 'upload',
      param,
    });
  });
  return id;
}

export const datasetRoutes: Routes = {
  async createDataset(req, res, ctx) {
    const id = req.is('multipart/form-data')
      ? await createFromUpload(req, ctx)
      : await createFromJson(req, ctx);
    res.status(201).json(datasetView(await getDataset(ctx, tenantOf(req), id)) satisfies Schemas['Dataset']);
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
