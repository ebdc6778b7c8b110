import type { AppContext } from '../context.js';
import { notFound } from '../errors.js';
import type { Schemas } from '../http.js';
import { loadSpec } from '../spec.js';

type TemplateConfig = Schemas['TemplateConfig'];
type Template = Schemas['Template'];

/**
 * The spec's defaults of an object schema (`LoraConfig`, `TrainingConfig`, `Hyperparams`): built-in
 * templates are stored complete, as a validated request with those sections would be.
 */
export function specDefaults(schema: string): Record<string, unknown> {
  const spec = loadSpec() as unknown as {
    components: { schemas: Record<string, { properties?: Record<string, { default?: unknown }> }> };
  };
  const defaults: Record<string, unknown> = {};
  for (const [key, property] of Object.entries(spec.components.schemas[schema]?.properties ?? {})) {
    if (property.default !== undefined) defaults[key] = property.default;
  }
  return defaults;
}

const lora = (overrides: Partial<Schemas['LoraConfig']>) =>
  ({ ...specDefaults('LoraConfig'), ...overrides }) as Schemas['LoraConfig'];
const training = (overrides: Partial<Schemas['TrainingConfig']>) =>
  ({ ...specDefaults('TrainingConfig'), ...overrides }) as Schemas['TrainingConfig'];
/** Hyperparams stay as given: their defaults belong to other job types (contract's ratio on a grow run). */
const hyperparams = (given: Partial<Schemas['Hyperparams']>) => given as Schemas['Hyperparams'];

interface BuiltinTemplate {
  name: string;
  description: string;
  config: TemplateConfig;
}

/** Built-in templates carry a fixed creation time so their answers never change between starts. */
const BUILTIN_CREATED_AT = '2025-01-01T00:00:00.000Z';

/** The shipped templates: read-only, listed before every tenant's own, and never shadowed. */
export const BUILTIN_TEMPLATES: readonly BuiltinTemplate[] = [
  {
    name: 'lora-default',
    description: 'LoRA fine-tune with widely used defaults: rank 16 on all linear layers, lr 2e-4, 3 epochs.',
    config: {
      type: 'finetune',
      method: 'lora',
      lora_config: lora({
        r: 16,
        lora_alpha: 32,
        lora_dropout: 0.05,
        target_modules: 'all-linear',
        bias: 'none',
      }),
      training_config: training({
        num_epochs: 3,
        batch_size: 4,
        gradient_accumulation_steps: 1,
        learning_rate: 2e-4,
        warmup_steps: 10,
        lr_scheduler: 'linear',
        max_seq_length: 2048,
      }),
    },
  },
  {
    name: 'qlora-7b',
    description:
      'QLoRA (4-bit base) for 7B-class models on one 24 GB GPU: rank 64, gradient checkpointing, effective batch 16. Needs a CUDA worker.',
    config: {
      type: 'finetune',
      method: 'qlora',
      base_model: 'qwen2.5-7b-instruct',
      lora_config: lora({
        r: 64,
        lora_alpha: 16,
        lora_dropout: 0.1,
        target_modules: 'all-linear',
        bias: 'none',
      }),
      training_config: training({
        num_epochs: 1,
        batch_size: 4,
        gradient_accumulation_steps: 4,
        learning_rate: 2e-4,
        warmup_steps: 30,
        lr_scheduler: 'cosine',
        max_seq_length: 2048,
        use_gradient_checkpointing: true,
      }),
    },
  },
  {
    name: 'full-small',
    description: 'Full fine-tune of a small model (every weight trains): lr 2e-5, weight decay 0.01.',
    config: {
      type: 'finetune',
      method: 'full',
      base_model: 'smollm2-135m-instruct',
      training_config: training({
        num_epochs: 3,
        batch_size: 8,
        learning_rate: 2e-5,
        warmup_steps: 50,
        lr_scheduler: 'cosine',
        weight_decay: 0.01,
        max_seq_length: 1024,
      }),
    },
  },
  {
    name: 'grow-2x',
    description:
      'Grow a model (function-preserving) and train it with two full passes, the recommended quality setting.',
    config: { type: 'train', hyperparams: hyperparams({ turns: 2 }) },
  },
  {
    name: 'contract-half',
    description: 'Contract a model: prune with ratio 0.5 over 8 layers.',
    config: {
      type: 'contract',
      hyperparams: hyperparams({ contraction_ratio: 0.5, num_layers_to_contract: 8 }),
    },
  },
];

export const isBuiltinTemplate = (name: string) => BUILTIN_TEMPLATES.some((t) => t.name === name);

/** A `templates` row as the API shows it. */
export function templateView(row: {
  name: string;
  description: string;
  config: TemplateConfig;
  created_at: Date | string;
}): Template {
  return {
    name: row.name,
    description: row.description,
    builtin: false,
    config: row.config,
    created_at: new Date(row.created_at).toISOString(),
  };
}

export function builtinTemplateViews(): Template[] {
  return BUILTIN_TEMPLATES.map((t) => ({
    name: t.name,
    description: t.description,
    builtin: true,
    config: structuredClone(t.config),
    created_at: BUILTIN_CREATED_AT,
  }));
}

/** A built-in or the tenant's template by name; `404 not_found` otherwise. */
export async function getTemplate(
  ctx: Pick<AppContext, 'knex'>,
  tenantId: string,
  name: string,
  param = 'template',
): Promise<Template> {
  const builtin = builtinTemplateViews().find((t) => t.name === name);
  if (builtin) return builtin;
  const row = await ctx.knex('templates').where({ tenant_id: tenantId, name }).first();
  if (!row) throw notFound('template', name, param);
  return templateView(row);
}

/** The job fields a template presets (what createTrainingJob starts from). */
export async function getTemplateConfig(
  ctx: Pick<AppContext, 'knex'>,
  tenantId: string,
  name: string,
): Promise<TemplateConfig> {
  return (await getTemplate(ctx, tenantId, name)).config;
}
