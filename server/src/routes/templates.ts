import { conflict, notFound } from '../errors.js';
import { listEnvelope, page, pathParam, type Routes, type Schemas, sentBody, tenantOf } from '../http.js';
import { forgetIdempotentCreates, idempotent } from '../services/idempotency.js';
import { builtinTemplateViews, getTemplate, isBuiltinTemplate, templateView } from '../services/templates.js';

export const templateRoutes: Routes = {
  async listTemplates(req, res, ctx) {
    const tenantId = tenantOf(req);
    const { limit, offset } = page(req);
    // One list: the built-ins first, then the tenant's own, newest first.
    const builtins = builtinTemplateViews();
    const counted = await ctx.knex('templates').where({ tenant_id: tenantId }).count({ count: '*' }).first();
    const total = builtins.length + Number(counted?.count ?? 0);
    const fromBuiltins = builtins.slice(offset, offset + limit);
    const customOffset = Math.max(0, offset - builtins.length);
    const customLimit = limit - fromBuiltins.length;
    const custom =
      customLimit > 0
        ? await ctx
            .knex('templates')
            .where({ tenant_id: tenantId })
            .orderBy([
              { column: 'created_at', order: 'desc' },
              { column: 'name', order: 'asc' },
            ])
            .limit(customLimit)
            .offset(customOffset)
        : [];
    const items = [...fromBuiltins, ...custom.map(templateView)];
    res.json(listEnvelope('templates', items, total, offset) satisfies Schemas['TemplateList']);
  },

  async createTemplate(req, res, ctx) {
    const tenantId = tenantOf(req);
    // Stored as sent: a template presets only what its author chose (see sentBody).
    const body = sentBody<'createTemplate'>(res);
    if (isBuiltinTemplate(body.name)) {
      throw conflict(`"${body.name}" is a built-in template; choose another name.`, 'conflict', 'name');
    }
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
    // `returning` gives rows on both drivers (a bare delete's count differs between pg and PGlite).
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
