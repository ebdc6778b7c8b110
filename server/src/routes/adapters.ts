import type { Knex } from 'knex';
import type { AppContext } from '../context.js';
import { ApiError, conflict, notFound } from '../errors.js';
import { isoRequired, page, pathParam, type Routes, type Schemas, tenantOf } from '../http.js';
import { liveServingWorkers, resolveInferenceTarget, runModelAction } from '../services/inference.js';
import { listPage, newestFirst } from '../services/paging.js';
import {
  type AdapterRow,
  type FileRow,
  jobKinds,
  jobOutputFiles,
  outputDirectory,
  outputFileView,
  totalSizeMb,
} from '../services/registry.js';

const json = <T>(value: unknown): T => (typeof value === 'string' ? JSON.parse(value) : value) as T;

function adapterView(
  ctx: AppContext,
  row: AdapterRow,
  files: FileRow[],
  kinds: Map<string, string>,
  loaded: string | null,
  loadedOn: string[],
): Schemas['Adapter'] {
  return {
    name: row.name,
    path: outputDirectory(ctx, row.job_id, files),
    model_name: row.model_name,
    job_id: row.job_id,
    created_at: isoRequired(row.created_at),
    size_mb: totalSizeMb(files),
    description: row.description,
    is_loaded: row.name === loaded,
    loaded_on: loadedOn,
    training_config: json(row.training_config),
    metrics: json(row.metrics),
    files: files.map((f) => outputFileView(ctx, f, row.job_id ? kinds.get(row.job_id) : undefined)),
  };
}

/** Adapters with their files (the job's outputs), as the API shows them. */
async function adapterViews(
  ctx: AppContext,
  tenantId: string,
  rows: AdapterRow[],
): Promise<Schemas['Adapter'][]> {
  const jobIds = rows.map((r) => r.job_id).filter((id): id is string => id !== null);
  const [files, kinds, loaded, placements] = await Promise.all([
    jobOutputFiles(ctx.knex, tenantId, jobIds),
    jobKinds(ctx.knex, jobIds),
    loadedAdapter(ctx.knex, tenantId),
    livePlacements(
      ctx,
      tenantId,
      rows.map((r) => r.name),
    ),
  ]);
  return rows.map((row) =>
    adapterView(
      ctx,
      row,
      (row.job_id && files.get(row.job_id)) || [],
      kinds,
      loaded,
      placements.get(row.name) ?? [],
    ),
  );
}

/** Serving workers (seen lately) holding each adapter in memory. */
async function livePlacements(
  ctx: AppContext,
  tenantId: string,
  names: string[],
): Promise<Map<string, string[]>> {
  const rows = await ctx
    .knex('adapter_placements')
    .where({ tenant_id: tenantId })
    .whereIn('adapter_name', names);
  const live = await liveServingWorkers(ctx, [...new Set(rows.map((r) => r.worker_id as string))]);
  const byName = new Map<string, string[]>();
  for (const r of rows.filter((r) => live.has(r.worker_id))) {
    byName.set(r.adapter_name, [...(byName.get(r.adapter_name) ?? []), r.worker_id]);
  }
  return byName;
}

/**
 * Asks every serving worker that holds the adapter to drop it (one that has gone away has nothing to
 * drop), then forgets where it was.
 */
async function unloadEverywhere(ctx: AppContext, tenantId: string, name: string): Promise<void> {
  const holders = await ctx
    .knex('adapter_placements')
    .where({ tenant_id: tenantId, adapter_name: name })
    .pluck('worker_id');
  const live = await liveServingWorkers(ctx, holders as string[]);
  if (live.size > 0) {
    const target = await resolveInferenceTarget(ctx, tenantId, name);
    for (const worker of live) await runModelAction(ctx, tenantId, target, 'unload', worker);
  }
  await ctx.knex('adapter_placements').where({ tenant_id: tenantId, adapter_name: name }).delete();
}

async function loadedAdapter(db: Knex | Knex.Transaction, tenantId: string): Promise<string | null> {
  const tenant = await db('tenants').where({ id: tenantId }).first('loaded_adapter');
  return tenant?.loaded_adapter ?? null;
}

async function getAdapterRow(
  db: Knex | Knex.Transaction,
  tenantId: string,
  name: string,
): Promise<AdapterRow> {
  const row = await db('adapters').where({ tenant_id: tenantId, name }).first();
  if (!row) throw notFound('adapter', name, 'adapter_name');
  return row as AdapterRow;
}

export const adapterRoutes: Routes = {
  async listAdapters(req, res, ctx) {
    const tenantId = tenantOf(req);
    const body = {
      ...(await listPage(
        'adapters',
        ctx.knex('adapters').where({ tenant_id: tenantId }),
        page(req),
        newestFirst({ column: 'name', order: 'asc' }),
        (rows: AdapterRow[]) => adapterViews(ctx, tenantId, rows),
      )),
      current_adapter: await loadedAdapter(ctx.knex, tenantId),
    };
    res.json(body satisfies Schemas['AdapterList']);
  },

  async getAdapter(req, res, ctx) {
    const tenantId = tenantOf(req);
    const row = await getAdapterRow(ctx.knex, tenantId, pathParam(req, 'adapter_name'));
    const [view] = await adapterViews(ctx, tenantId, [row]);
    res.json(view! satisfies Schemas['Adapter']);
  },

  async loadAdapter(req, res, ctx) {
    const tenantId = tenantOf(req);
    const name = pathParam(req, 'adapter_name');
    await getAdapterRow(ctx.knex, tenantId, name);
    const target = await resolveInferenceTarget(ctx, tenantId, name);
    // One adapter is loaded per tenant: loading this one replaces any other.
    const previous = await loadedAdapter(ctx.knex, tenantId);
    const { worker_id } = await runModelAction(ctx, tenantId, target, 'load');
    if (previous && previous !== name) await unloadEverywhere(ctx, tenantId, previous);
    await ctx.knex.raw(
      `INSERT INTO adapter_placements (tenant_id, adapter_name, worker_id) VALUES (?, ?, ?)
       ON CONFLICT (tenant_id, adapter_name, worker_id) DO UPDATE SET loaded_at = now()`,
      [tenantId, name, worker_id],
    );
    await ctx.knex('tenants').where({ id: tenantId }).update({ loaded_adapter: name });
    res.json({
      adapter_name: name,
      status: 'loaded',
      message: `Adapter ${name} loaded on serving worker ${worker_id}`,
    } satisfies Schemas['AdapterAction']);
  },

  async unloadAdapter(req, res, ctx) {
    const tenantId = tenantOf(req);
    const previous = await loadedAdapter(ctx.knex, tenantId);
    if (!previous) throw new ApiError(400, 'no_adapter_loaded', 'No adapter is loaded.');
    await unloadEverywhere(ctx, tenantId, previous);
    await ctx
      .knex('tenants')
      .where({ id: tenantId, loaded_adapter: previous })
      .update({ loaded_adapter: null });
    res.json({
      adapter_name: previous,
      status: 'unloaded',
      message: `Adapter ${previous} unloaded successfully`,
    } satisfies Schemas['AdapterAction']);
  },

  async deleteAdapter(req, res, ctx) {
    const tenantId = tenantOf(req);
    const name = pathParam(req, 'adapter_name');
    await getAdapterRow(ctx.knex, tenantId, name);
    // Out of the workers' memory first: a deleted adapter answers no request.
    await unloadEverywhere(ctx, tenantId, name);
    const removed = await ctx.knex.transaction(async (trx) => {
      const adapter = await getAdapterRow(trx, tenantId, name);
      if (adapter.job_id) {
        // A merge names the adapter's job (parent_job_id); a job made from its model
        // (source_model_id: a benchmark, a further fine-tune) names that model (model_id).
        // Both load the files deleted below.
        const user = await trx('jobs')
          .where({ tenant_id: tenantId })
          .andWhere((q) =>
            q
              .where('parent_job_id', adapter.job_id)
              .orWhereIn(
                'model_id',
                trx('models').where({ tenant_id: tenantId, job_id: adapter.job_id }).select('id'),
              ),
          )
          .whereIn('status', ['pending', 'running'])
          .first('id');
        if (user) throw conflict(`Adapter ${name} is an input of job ${user.id}, which has not finished.`);
      }
      await trx('tenants').where({ id: tenantId, loaded_adapter: name }).update({ loaded_adapter: null });
      let files: FileRow[] = [];
      if (adapter.job_id) {
        files = (await jobOutputFiles(trx, tenantId, [adapter.job_id])).get(adapter.job_id) ?? [];
        // The adapter's model entry (kind adapter / distilled) is the same files: it goes with them.
        const models = await trx('models')
          .where({ tenant_id: tenantId, job_id: adapter.job_id })
          .whereIn('kind', ['adapter', 'distilled'])
          .pluck('id');
        if (models.length > 0) {
          await trx('tenants')
            .where({ id: tenantId })
            .whereIn('active_model_id', models)
            .update({ active_model_id: null });
          await trx('models').whereIn('id', models).delete();
        }
        await trx('files')
          .whereIn(
            'id',
            files.map((f) => f.id),
          )
          .delete();
      }
      await trx('adapters').where({ tenant_id: tenantId, name }).delete();
      return files;
    });
    // Bytes go after the rows are gone: a crash in between leaves orphan files, never dangling rows.
    for (const file of removed) await ctx.storage.remove(file.rel_path);
    res.json({
      adapter_name: name,
      status: 'deleted',
      message: `Adapter ${name} deleted successfully`,
    } satisfies Schemas['AdapterAction']);
  },
};
