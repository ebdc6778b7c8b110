/**
 * createDistillationJob's request (seed 000) resolved into a job: the config with its defaults,
 * the teacher endpoint, the student model, the prompts, and the cost estimate.
 */
import type { AppContext } from '../context.js';
import { ApiError, invalidConfig } from '../errors.js';
import type { BodyOf, Schemas } from '../http.js';
import { newId } from '../ids.js';
import type { Db } from '../queue/lease.js';
import { resolveBaseModel } from './catalog.js';
import { type DatasetRow, estimateTokens, getDataset } from './datasets.js';
import { estimateJobCostUsd, teacherUsdPerMillionTokens } from './estimate.js';
import { JOB_INPUT } from './job-spec.js';
import { refuseUnusedQuantization } from './training-request.js';

export type DistillationJobCreate = BodyOf<'createDistillationJob'>;
type DistillationConfig = Schemas['DistillationConfig'];

/** Seed 000's documented defaults (and the spec's for the fields the seed leaves open). */
const DEFAULTS = {
  num_prompts: 500,
  n_samples: 4,
  training_steps: 100,
  bond_beta: 0.5,
  bond_gamma: 0.1,
  temperature: 0.8,
  max_new_tokens: 128,
  learning_rate: 2e-4,
  lora_rank: 16,
  export_gguf: false,
};

/** Public endpoints of providers whose prefix needs no `teacher_base_url`. All speak the OpenAI API. */
const PROVIDER_BASE_URLS: Record<string, string> = {
  openai: 'https://api.openai.com/v1',
  openrouter: 'https://openrouter.ai/api/v1',
  together: 'https://api.together.xyz/v1',
  groq: 'https://api.groq.com/openai/v1',
};

/** Micro-batch the student trains on, for the token estimate. */
const STUDENT_BATCH = 4;

export interface Teacher {
  provider: 'openai' | 'local';
  model: string;
  base_url: string | null;
}

/**
 * A tenant's teacher endpoint: http(s) without credentials in it (the key goes in teacher_api_key,
 * which is kept out of the stored config). Which hosts a worker then reaches is the worker's egress
 * policy (`TUNERY_TEACHER_ALLOWED_HOSTS`), checked where the connection is made.
 */
export function teacherUrl(raw: string, param = 'config.teacher_base_url'): string {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw invalidConfig('teacher_base_url is not a URL.', param);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw invalidConfig('teacher_base_url must be an http(s) URL.', param);
  }
  if (url.username || url.password) {
    throw invalidConfig(
      'teacher_base_url may not carry credentials: give the key as teacher_api_key.',
      param,
    );
  }
  return raw;
}

/** `openai/gpt-4o` → an OpenAI-compatible endpoint; `local/<base model>` → a model the worker loads. */
async function resolveTeacher(
  ctx: AppContext,
  tenantId: string,
  config: DistillationConfig,
): Promise<Teacher> {
  const slash = config.teacher_model.indexOf('/');
  const prefix = slash > 0 ? config.teacher_model.slice(0, slash) : '';
  const model = config.teacher_model.slice(slash + 1);
  if (!prefix || !model) {
    throw invalidConfig(
      'teacher_model must be provider-prefixed, e.g. "openai/gpt-4o" or "local/<base model>".',
      'config.teacher_model',
    );
  }
  if (prefix === 'local') {
    if (config.teacher_base_url) {
      throw invalidConfig(
        'A local teacher runs on the worker: teacher_base_url applies to endpoint teachers only.',
        'config.teacher_base_url',
      );
    }
    if (config.teacher_api_key !== undefined) {
      throw invalidConfig(
        'A local teacher runs on the worker: teacher_api_key applies to endpoint teachers only.',
        'config.teacher_api_key',
      );
    }
    const base = await withParam(
      resolveBaseModel(ctx, tenantId, { base_model: model }),
      'config.teacher_model',
    );
    return { provider: 'local', model: base.source, base_url: null };
  }
  const baseUrl = config.teacher_base_url ? teacherUrl(config.teacher_base_url) : PROVIDER_BASE_URLS[prefix];
  if (!baseUrl) {
    throw invalidConfig(
      `Unknown teacher provider "${prefix}": give config.teacher_base_url of its OpenAI-compatible endpoint.`,
      'config.teacher_model',
    );
  }
  return { provider: 'openai', model, base_url: baseUrl };
}

/** Re-labels a catalog error with the field of this request that named the model. */
async function withParam<T>(promise: Promise<T>, param: string): Promise<T> {
  try {
    return await promise;
  } catch (err) {
    if (err instanceof ApiError && err.status === 400) throw new ApiError(400, err.code, err.message, param);
    throw err;
  }
}

/** One prompt from a dataset record of any format: its text, its prompt, or its first user turn. */
function promptOf(record: Record<string, unknown>): string | null {
  if (typeof record.prompt === 'string' && record.prompt) return record.prompt;
  if (typeof record.text === 'string' && record.text) return record.text;
  if (Array.isArray(record.messages)) {
    const turn = (record.messages as { role?: string; content?: string }[]).find((m) => m.role === 'user');
    return turn?.content || null;
  }
  return null;
}

/** The user prompt of one recorded LLM call: `user_prompt`, else the last user message. */
function promptOfCall(call: {
  user_prompt?: string;
  messages?: { role?: string; content?: string }[];
}): string | null {
  if (typeof call.user_prompt === 'string' && call.user_prompt) return call.user_prompt;
  const users = (Array.isArray(call.messages) ? call.messages : []).filter(
    (m) => m.role === 'user' && m.content,
  );
  return users.at(-1)?.content ?? null;
}

/** Trajectories read per query when collecting prompts from them. */
const TRAJECTORY_PAGE = 100;

/**
 * Without a dataset or inline prompts, the prompts are the tenant's recorded traffic (seed 000's
 * create names none): the user prompts of its newest trajectories' LLM calls, up to `limit`.
 */
async function promptsOfTrajectories(ctx: AppContext, tenantId: string, limit: number) {
  const prompts: string[] = [];
  let trajectories = 0;
  // A tenant may have recorded far more traffic than the job needs: read a page at a time and stop
  // once `limit` prompts are in. Pages follow (created_at, id) from the last row; its created_at is
  // carried as text, because a JS Date would drop the microseconds and skip or repeat rows.
  let after: { created_at: string; id: string } | undefined;
  while (prompts.length < limit) {
    const query = ctx
      .knex('trajectories')
      .where({ tenant_id: tenantId })
      .orderBy([
        { column: 'created_at', order: 'desc' },
        { column: 'id', order: 'desc' },
      ])
      .limit(TRAJECTORY_PAGE)
      .select('id', 'llm_calls', ctx.knex.raw('created_at::text AS created_at'));
    if (after) query.whereRaw('(created_at, id) < (?::timestamptz, ?)', [after.created_at, after.id]);
    const rows = await query;
    for (const row of rows) {
      const before = prompts.length;
      for (const call of (row.llm_calls ?? []) as Parameters<typeof promptOfCall>[0][]) {
        const prompt = promptOfCall(call);
        if (prompt && prompts.length < limit) prompts.push(prompt);
      }
      if (prompts.length > before) trajectories++;
      if (prompts.length >= limit) break;
    }
    if (rows.length < TRAJECTORY_PAGE) break;
    after = rows.at(-1);
  }
  return { prompts, trajectories };
}

/** The prompts of an existing dataset, up to `limit`. */
async function promptsOfDataset(ctx: AppContext, dataset: DatasetRow, limit: number): Promise<string[]> {
  const file = await ctx.knex('files').where({ id: dataset.file_id }).first('rel_path');
  if (!file) return [];
  const chunks: Buffer[] = [];
  for await (const chunk of ctx.storage.read(file.rel_path)) chunks.push(chunk as Buffer);
  const prompts: string[] = [];
  for (const line of Buffer.concat(chunks).toString('utf8').split('\n')) {
    if (prompts.length >= limit) break;
    if (!line.trim()) continue;
    const prompt = promptOf(JSON.parse(line) as Record<string, unknown>);
    if (prompt) prompts.push(prompt);
  }
  return prompts;
}

/** Where the prompts come from: a dataset, the request, or the tenant's trajectories. */
async function promptSource(
  ctx: AppContext,
  tenantId: string,
  datasetId: string | undefined,
  inline: string[] | undefined,
  limit: number,
): Promise<
  | { kind: 'existing'; id: string; prompts: string[] }
  | { kind: 'new'; dataset: Extract<DistillationPlan['dataset'], { kind: 'new' }> }
> {
  if (datasetId) {
    const dataset = await getDataset(ctx, tenantId, datasetId);
    return { kind: 'existing', id: dataset.id, prompts: await promptsOfDataset(ctx, dataset, limit) };
  }
  if (inline)
    return { kind: 'new', dataset: { kind: 'new', prompts: inline.slice(0, limit), source: 'inline' } };
  const recorded = await promptsOfTrajectories(ctx, tenantId, limit);
  return {
    kind: 'new',
    dataset: {
      kind: 'new',
      prompts: recorded.prompts,
      source: 'trajectories',
      trajectoryCount: recorded.trajectories,
    },
  };
}

export interface DistillationPlan {
  config: Record<string, unknown>;
  secrets: Record<string, unknown>;
  studentName: string;
  /** The dataset to link, or prompts (inline or from trajectories) to store as one. */
  dataset:
    | { kind: 'existing'; id: string }
    | { kind: 'new'; prompts: string[]; source: 'inline' | 'trajectories'; trajectoryCount?: number };
  /** What the worker gets as its `prompts` input, capped at num_prompts. */
  prompts: string[];
  estimatedUsd: number;
}

/** Validates and resolves a distillation request; `400 invalid_config` names the field. */
export async function planDistillationJob(
  ctx: AppContext,
  tenantId: string,
  body: DistillationJobCreate,
): Promise<DistillationPlan> {
  const { teacher_api_key, prompts: inlinePrompts, ...given } = body.config;
  const config = { ...DEFAULTS, ...given };
  refuseUnusedQuantization(config, 'config.quantization_types');
  if (config.dataset_id && inlinePrompts) {
    throw invalidConfig('Give config.dataset_id or config.prompts, not both.', 'config.prompts');
  }
  const teacher = await resolveTeacher(ctx, tenantId, body.config);
  const student = await withParam(
    resolveBaseModel(ctx, tenantId, { base_model: config.student_model }),
    'config.student_model',
  );
  const source = await promptSource(ctx, tenantId, config.dataset_id, inlinePrompts, config.num_prompts);
  const prompts = source.kind === 'existing' ? source.prompts : source.dataset.prompts;
  if (prompts.length === 0) {
    throw invalidConfig(
      'No prompts to distil: give config.dataset_id or config.prompts, or record trajectories first.',
      config.dataset_id ? 'config.dataset_id' : 'config.prompts',
    );
  }

  const promptTokens = estimateTokens(prompts.reduce((sum, p) => sum + Buffer.byteLength(p), 0));
  const teacherTokens =
    teacher.provider === 'local'
      ? 0
      : promptTokens * config.n_samples + prompts.length * config.n_samples * config.max_new_tokens;
  const perExample = Math.ceil(promptTokens / prompts.length) + config.max_new_tokens;
  // fixed at submission: the job is billed at the price it was estimated (and budgeted) with
  const teacherPrice = teacherUsdPerMillionTokens(ctx, config.teacher_model, teacher.provider);
  const estimatedUsd = estimateJobCostUsd(ctx, {
    params: student.params,
    method: 'lora',
    totalTokens: config.training_steps * STUDENT_BATCH * perExample,
    teacherTokens,
    teacherUsdPerMillionTokens: teacherPrice,
  });
  const quantization = config.quantization_types ?? (config.export_gguf ? ['q4_k_m'] : []);
  return {
    config: {
      ...config,
      quantization_types: quantization,
      teacher,
      teacher_usd_per_million_tokens: teacherPrice,
      student: { id: student.id, name: student.name, source: student.source },
      output_name: body.name && /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(body.name) ? body.name : undefined,
    },
    secrets: teacher_api_key ? { teacher_api_key } : {},
    studentName: student.name,
    dataset: source.kind === 'existing' ? { kind: 'existing', id: source.id } : source.dataset,
    prompts,
    estimatedUsd,
  };
}

/** Writes the worker's `prompts` input (JSONL of `{"prompt"}`) and records it as the job's own file. */
export async function storePromptsInput(
  ctx: AppContext,
  db: Db,
  tenantId: string,
  jobId: string,
  prompts: string[],
): Promise<void> {
  const name = 'prompts.jsonl';
  const jsonl = `${prompts.map((prompt) => JSON.stringify({ prompt })).join('\n')}\n`;
  const stored = await ctx.storage.putBuffer(['jobs', jobId, 'inputs', name], jsonl);
  await db('files').insert({
    id: newId('file'),
    tenant_id: tenantId,
    owner_kind: JOB_INPUT,
    owner_id: jobId,
    name,
    rel_path: stored.relPath,
    size_bytes: stored.sizeBytes,
    sha256: stored.sha256,
  });
}
