import { conflict, notFound } from '../errors.js';
import { page, pathParam, type Routes, type Schemas, sentBody, tenantOf } from '../http.js';
import { forgetIdempotentCreates, idempotent } from '../services/idempotency.js';
import { cursorValues, encodeCursor, listPage, newestFirst } from '../services/paging.js';
import { builtinTemplateViews, getTemplate, isBuiltinTemplate, templateView } from '../services/templates.js';
import { checkTemplateConfig } from '../services/training-request.js';

export const templateRoutes: Routes = {
  async listTemplates(req, res, ctx) {
    const tenantId = tenantOf(req);
    const paging = page(req);
    // One list: the built-ins first (a cursor there holds one value, the built-in's index), then
    // the tenant's own, newest first (a cursor there is their keyset cursor, two values).
    const builtins = builtinTemplateViews();
    const cursor = paging.after === undefined ? undefined : cursorValues(paging.after);
    const builtinStart =
      cursor === undefined ? paging.offset : cursor.length === 1 ? Number(cursor[0]) + 1 : Infinity;
    const fromBuiltins = builtins.slice(builtinStart, builtinStart + paging.limit);
    const own = ctx.knex('templates').where({ tenant_id: tenantId });
    const counted = await own.clone().count({ count: '*' }).first();
    const ownTotal = Number(counted?.count ?? 0);
    const ownLimit = paging.limit - fromBuiltins.length;
    const ownPage =
      ownLimit > 0
        ? await listPage(
            'templates',
            own,
            cursor?.length === 2
              ? { limit: ownLimit, offset: 0, after: paging.after }
              : { limit: ownLimit, offset: Math.max(0, paging.offset - builtins.length) },
            newestFirst({ column: 'name', order: 'asc' }),
            (rows: Parameters<typeof templateView>[0][]) => rows.map(templateView),
          )
        : undefined;
    const moreBuiltins = builtinStart + fromBuiltins.length < builtins.length;
    const hasMore = ownPage ? ownPage.has_more : moreBuiltins || ownTotal > 0;
    const body: Schemas['TemplateList'] = {
      templates: [...fromBuiltins, ...(ownPage?.templates ?? [])],
      total: builtins.length + ownTotal,
      has_more: hasMore,
      next_cursor: ownPage
        ? ownPage.next_cursor
        : hasMore
          ? encodeCursor([String(builtinStart + fromBuiltins.length - 1)])
          : null,
    };
    res.json(body);
  },

  async createTemplate(req, res, ctx) {
    const tenantId = tenantOf(req);
    // Stored as sent: a template presets only what its author chose (see sentBody).
    const body = sentBody<'createTemplate'>(res);
    if (isBuiltinTemplate(body.name)) {
      throw conflict(`"${body.name}" is a built-in template; choose another name.`, 'conflict', 'name');
    }
    checkTemplateConfig(body.config);
    // Templates are named, not numbered: the name is the object's id for idempotency.
    await idempotent(ctx, req, 'createTemplate', { id: body.name }, async () => {
      const inserted = await ctx
        .knex('templates')
        .insert({
          tenant_id: tenantId,
          name: body.name,
          description: body.description ?? '',
          config: JSON.stringify(body.config),
        })
        .onConflict(['tenant_id', 'name'])
        .ignore()
        .returning('name');
      if (inserted.length === 0)
        throw conflict(`A template named "${body.name}" already exists.`, 'conflict', 'name');
    });
    res.status(201).json((await getTemplate(ctx, tenantId, body.name, 'name')) satisfies Schemas['Template']);
  },

  async getTemplate(req, res, ctx) {
    const template = await getTemplate(ctx, tenantOf(req), pathParam(req, 'template_name'), 'template_name');
    res.json(template satisfies Schemas['Template']);
  },

  async deleteTemplate(req, res, ctx) {
    const tenantId = tenantOf(req);
    const name = pathParam(req, 'template_name');
    if (isBuiltinTemplate(name)) throw conflict(`"${name}" is a built-in template and cannot be deleted.`);
    // `returning` answers the deleted rows, on either database.
    const deleted = await ctx
      .knex('templates')
      .where({ tenant_id: tenantId, name })
      .delete()
      .returning('name');
    if (deleted.length === 0) throw notFound('template', name, 'template_name');
    await forgetIdempotentCreates(ctx.knex, tenantId, name);
    res.json({ id: name, deleted: true } satisfies Schemas['Deleted']);
  },
};
