/** OpenAI's `files`, backed by Tunery datasets: the file id is the dataset id. */
import type { Request } from 'express';
import type { AppContext } from '../../context.js';
import { ApiError, notFound } from '../../errors.js';
import { pathParam, queryInt, type Routes, type Schemas, tenantOf } from '../../http.js';
import { type DatasetRow, getDataset, removeDataset, toDatasetRow } from '../../services/datasets.js';
import { sendStoredFile } from '../../services/downloads.js';
import { createFromUpload } from '../datasets.js';
import { cursorPage, rowsAfter, unixSeconds } from './paging.js';

function fileView(row: DatasetRow): Schemas['OpenAIFile'] {
  return {
    id: row.id,
    object: 'file',
    bytes: row.size_bytes,
    created_at: unixSeconds(row.created_at),
    filename: row.name,
    purpose: 'fine-tune',
    // validated line by line on upload: a stored file is ready to train on
    status: 'processed',
  };
}

/** The caller's file, or 404 (another tenant's does not exist), with OpenAI's param name. */
async function fileOf(req: Request, ctx: AppContext): Promise<DatasetRow> {
  const id = pathParam(req, 'file_id');
  try {
    return await getDataset(ctx, tenantOf(req), id);
  } catch (err) {
    throw err instanceof ApiError && err.status === 404
      ? notFound('file', id, 'file_id', 'file_not_found')
      : err;
  }
}

export const openAIFileRoutes: Routes = {
  async createOpenAIFile(req, res, ctx) {
    // the upload engine checked every line against OpenAI's chat format (services/openai-files.ts)
    const id = await createFromUpload(req, ctx);
    res.json(fileView(await getDataset(ctx, tenantOf(req), id)) satisfies Schemas['OpenAIFile']);
  },

  async listOpenAIFiles(req, res, ctx) {
    const purpose = req.query.purpose as string | undefined;
    const limit = queryInt(req, 'limit', 10000);
    // every dataset is a fine-tune file; another purpose has none
    const visible = ctx.knex('datasets').where({ tenant_id: tenantOf(req) });
    if (purpose !== undefined && purpose !== 'fine-tune') visible.whereRaw('false');
    const order = req.query.order === 'asc' ? 'asc' : 'desc';
    const rows = await rowsAfter(visible, req.query.after as string | undefined, limit, order);
    const page = cursorPage(rows, limit, (r) => fileView(toDatasetRow(r)));
    res.json({
      ...page,
      first_id: page.data[0]?.id ?? null,
      last_id: page.data.at(-1)?.id ?? null,
    } satisfies Schemas['OpenAIFileList']);
  },

  async getOpenAIFile(req, res, ctx) {
    res.json(fileView(await fileOf(req, ctx)) satisfies Schemas['OpenAIFile']);
  },

  async deleteOpenAIFile(req, res, ctx) {
    const row = await fileOf(req, ctx);
    await removeDataset(ctx, row.tenant_id, row.id);
    res.json({ id: row.id, object: 'file', deleted: true } satisfies Schemas['OpenAIFileDeleted']);
  },

  async getOpenAIFileContent(req, res, ctx) {
    const row = await fileOf(req, ctx);
    const file = await ctx.knex('files').where({ id: row.file_id, tenant_id: row.tenant_id }).first();
    if (!file) throw notFound('file content for', row.id, 'file_id', 'file_not_found');
    await sendStoredFile(ctx, req, res, file);
  },
};
