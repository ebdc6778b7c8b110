/**
 * `backend: native` on a training job (seed 004): a prompt-optimization job instead of a fine-tune.
 * The worker (`prompt_optimize`) rewrites the task's system prompt with an OpenAI-compatible teacher
 * and scores each rewrite on held-out examples; see `prompt_optimization` in the spec.
 */
import type { AppContext } from '../context.js';
import { invalidConfig } from '../errors.js';
import { getDataset, latestDataset } from './datasets.js';
import { teacherUrl } from './distillation-request.js';
import type { TrainingJobCreate, TrainingJobPlan } from './training-request.js';

/** The fields a prompt-optimization request uses; any other is refused rather than ignored. */
const NATIVE_FIELDS = new Set([
  'backend',
  'base_model',
  'dataset_id',
  'max_steps',
  'prompt_optimization',
  'run_name',
  'idempotency_key',
  'priority',
  'max_attempts',
]);
const DEFAULT_ITERATIONS = 3;
const MAX_ITERATIONS = 50; // the worker's bound: more rounds rarely help and each one pays the teacher

export async function planPromptOptimizeJob(
  ctx: AppContext,
  tenantId: string,
  body: TrainingJobCreate,
): Promise<TrainingJobPlan> {
  const unused = Object.keys(body).find(
    (key) => body[key as keyof TrainingJobCreate] !== undefined && !NATIVE_FIELDS.has(key),
  );
  if (unused)
    throw invalidConfig(`${unused} does not apply to backend native (prompt optimization).`, unused);
  const options = body.prompt_optimization;
  if (!options) {
    throw invalidConfig(
      'backend native optimizes a prompt with a teacher model: give prompt_optimization.teacher_model.',
      'prompt_optimization.teacher_model',
    );
  }
  const iterations = body.max_steps ?? DEFAULT_ITERATIONS;
  if (iterations > MAX_ITERATIONS) {
    throw invalidConfig(`backend native runs at most ${MAX_ITERATIONS} iterations (max_steps).`, 'max_steps');
  }
  const baseUrl =
    options.teacher_base_url && teacherUrl(options.teacher_base_url, 'prompt_optimization.teacher_base_url');
  // seed 004: without datasetId the newest dataset is used
  const dataset = body.dataset_id
    ? await getDataset(ctx, tenantId, body.dataset_id)
    : await latestDataset(ctx, tenantId);
  return {
    job: {
      kind: 'training',
      type: 'prompt_optimize',
      method: null,
      name: body.run_name ?? null,
      config: defined({
        type: 'prompt_optimize',
        teacher: defined({ provider: 'openai', model: options.teacher_model, base_url: baseUrl }),
        // the task model answers with each candidate prompt; by default the teacher answers itself
        task_model: body.base_model,
        metric: options.metric ?? 'exact_match',
        iterations,
        candidates_per_iteration: options.candidates_per_iteration ?? 2,
        eval_fraction: options.eval_fraction ?? 0.5,
        max_examples: options.max_examples ?? 200,
        initial_prompt: options.initial_prompt,
      }),
      // kept out of the stored config; the claim hands it to the worker as teacher.api_key
      secrets: defined({ teacher_api_key: options.teacher_api_key }),
      baseModel: body.base_model ?? options.teacher_model,
      parentJobId: null,
      modelId: null,
      requiredDevice: null,
      priority: body.priority,
      maxAttempts: body.max_attempts,
      totalSteps: iterations,
    },
    data: { kind: 'existing', dataset },
    // the teacher endpoint bills the tenant directly; the worker runs no model
    estimatedUsd: 0,
  };
}

const defined = (o: Record<string, unknown>) =>
  Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined));
