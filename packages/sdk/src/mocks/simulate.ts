// How fake jobs move: the lifecycle a real worker would drive, compressed into ticks. A tick is
// what one poll sees when `autoAdvance` is on, or one `advanceJob` step in a test.
import type { RequestBodyOf } from '../core/types.js';
import type { components } from '../generated/api.js';
import { MockHttpError } from './errors.js';
import { jobFiles, outputFile, outputsDir, storeFile } from './files.js';
import { type MockState, newId, now } from './state.js';

type Schemas = components['schemas'];
type TrainingJob = Schemas['TrainingJob'];
type DistillationJob = Schemas['DistillationJob'];
type JobStatus = Schemas['JobStatus'];

/** What `advanceJob` accepts: a status, a phase, or a step to run a training job to. */
export type AdvanceTarget =
  | JobStatus
  | Schemas['TrainingPhase']
  | Schemas['DistillationPhase']
  | { step: number };

export interface SimulationSettings {
  /** Training steps one tick runs. */
  stepsPerTick: number;
}

/** USD a training step costs in the fake; distillation adds teacher samples. */
export const COST_PER_STEP = 0.001;
export const COST_PER_TEACHER_SAMPLE = 0.0001;

const TERMINAL: ReadonlySet<JobStatus> = new Set(['completed', 'failed', 'cancelled']);
export const isTerminalStatus = (status: JobStatus) => TERMINAL.has(status);

// ------------------------------------------------------------------ shared timeline helpers

export function appendLog(
  state: MockState,
  jobId: string,
  text: string,
  stream: 'stdout' | 'stderr' = 'stdout',
) {
  const lines = state.logs.get(jobId) ?? [];
  lines.push({ seq: lines.length + 1, ts: now(), stream, text });
  state.logs.set(jobId, lines);
}

export function appendEvent(
  state: MockState,
  jobId: string,
  kind: string,
  payload: Record<string, unknown> = {},
) {
  const events = state.events.get(jobId) ?? [];
  events.push({ seq: events.length + 1, ts: now(), kind, payload });
  state.events.set(jobId, events);
}

/** Refuses a job whose estimated cost exceeds what is left of the budget (402 insufficient_credits). */
export function chargeable(state: MockState, estimatedCost: number) {
  const { limit_usd, spent_usd } = state.budget;
  if (limit_usd === null) return;
  const left = Math.max(0, limit_usd - spent_usd);
  if (estimatedCost > left) {
    throw new MockHttpError(
      402,
      'insufficient_credits',
      `Estimated cost $${estimatedCost.toFixed(2)} exceeds the $${left.toFixed(2)} left in your budget.`,
    );
  }
}

function accrue(state: MockState, job: { cost_accrued?: number }, usd: number) {
  job.cost_accrued = round((job.cost_accrued ?? 0) + usd, 6);
  state.budget.spent_usd = round(state.budget.spent_usd + usd, 6);
}

const round = (x: number, digits: number) => Math.round(x * 10 ** digits) / 10 ** digits;

// ------------------------------------------------------------------ training jobs

const RUNNING_PHASE: Record<Schemas['TrainingJobType'], Schemas['TrainingPhase']> = {
  finetune: 'training',
  train: 'growing',
  contract: 'contracting',
  merge: 'merging',
  benchmark: 'evaluating',
  prompt_optimize: 'evaluating',
};

/** Loss of step `step` of `total`: a smooth decay from about 2.5 to about 0.4. */
export function lossAt(step: number, total: number): number {
  return round(0.3 + 2.2 * Math.exp((-3 * step) / Math.max(1, total)), 4);
}

function trainingConfig(job: TrainingJob): Schemas['TrainingSettingsView'] {
  return job.config?.training ?? {};
}

export function startTrainingJob(state: MockState, job: TrainingJob) {
  if (job.status !== 'pending') return;
  const at = now();
  job.status = 'running';
  job.phase = RUNNING_PHASE[job.type];
  job.started_at ??= at;
  job.attempt = (job.attempt ?? 0) + 1;
  job.updated_at = at;
  appendEvent(state, job.id, 'claimed', { worker_id: 'mock-worker', attempt: job.attempt });
  appendEvent(state, job.id, 'phase', { phase: job.phase });
  appendLog(state, job.id, `loading ${job.base_model ?? 'model'}`);
}

/** Runs a running job up to `toStep`: metric points, log lines, checkpoints and cost for each step. */
export function stepTrainingJob(state: MockState, job: TrainingJob, toStep: number) {
  startTrainingJob(state, job);
  const total = job.total_steps ?? toStep;
  const target = Math.min(toStep, total);
  const config = trainingConfig(job);
  const lr0 = config.learning_rate ?? 0.0002;
  const batch = config.batch_size ?? 4;
  const seq = config.max_seq_length ?? 512;
  const loggingSteps = config.logging_steps ?? 10;
  const saveSteps = config.save_steps ?? 20;
  const points = state.metrics.get(job.id) ?? [];
  for (let step = job.current_step + 1; step <= target; step++) {
    const loss = lossAt(step, total);
    const lr = round(lr0 * (1 - (step - 1) / total), 8);
    points.push({
      ts: now(),
      step,
      phase: 'train',
      epoch: round(step / Math.max(1, total), 4),
      loss,
      lr,
      grad_norm: round(1 + loss / 2, 4),
      throughput: 1200,
      vram_gb: 0.5,
      tokens: step * batch * seq,
    });
    if (step % loggingSteps === 0 || step === target)
      appendLog(state, job.id, `step ${step}/${total} · loss ${loss}`);
    if (step % saveSteps === 0 && step < total) saveCheckpoint(state, job, step);
    job.current_step = step;
    job.current_loss = loss;
    job.learning_rate = lr;
    job.progress = round((100 * step) / total, 1);
    job.metrics = { train_loss: loss };
    accrue(state, job, COST_PER_STEP);
  }
  state.metrics.set(job.id, points);
  job.updated_at = now();
  if (job.current_step >= total) completeTrainingJob(state, job);
}

function saveCheckpoint(state: MockState, job: TrainingJob, step: number) {
  const name = `checkpoint-${step}`;
  const file = storeFile(state, name, `checkpoint ${step} of ${job.id}\n`, 4096);
  const list = state.checkpoints.get(job.id) ?? [];
  list.push({ name, step, size_bytes: file.bytes.length, created_at: file.createdAt, fileId: file.id });
  state.checkpoints.set(job.id, list);
  job.last_checkpoint_step = step;
  appendEvent(state, job.id, 'checkpoint', { name, step });
}

/** One poll's worth of progress. */
export function tickTrainingJob(state: MockState, job: TrainingJob, settings: SimulationSettings) {
  if (isTerminalStatus(job.status)) return;
  if (job.status === 'pending') return startTrainingJob(state, job);
  if (job.cancel_requested) return finishCancel(state, job);
  stepTrainingJob(state, job, job.current_step + settings.stepsPerTick);
}

export function advanceTrainingJob(state: MockState, job: TrainingJob, target: AdvanceTarget) {
  if (typeof target === 'object') return stepTrainingJob(state, job, target.step);
  switch (target) {
    case 'pending':
      return;
    case 'running':
      return startTrainingJob(state, job);
    case 'completed':
    case 'done':
      return stepTrainingJob(state, job, job.total_steps ?? job.current_step);
    case 'failed':
      return failTrainingJob(state, job, {
        code: 'training_error',
        message: 'The mock worker failed this job.',
      });
    case 'cancelled':
      return finishCancel(state, job);
    default:
      startTrainingJob(state, job);
      job.phase = target as Schemas['TrainingPhase'];
      appendEvent(state, job.id, 'phase', { phase: job.phase });
  }
}

export function failTrainingJob(
  state: MockState,
  job: TrainingJob,
  error: { code: string; message: string },
) {
  const at = now();
  job.status = 'failed';
  job.error = error;
  job.error_message = error.message;
  job.finished_at = at;
  job.updated_at = at;
  appendLog(state, job.id, `${error.code}: ${error.message}`, 'stderr');
  appendEvent(state, job.id, 'failed', { code: error.code });
}

/** The API's cancel: a pending job stops at once, a running one is flagged for its worker. */
export function requestCancel(state: MockState, job: TrainingJob | DistillationJob) {
  if (isTerminalStatus(job.status)) {
    // A distillation keeps seed 000's code for it.
    const code = state.distillationJobs.has(job.id) ? 'job_already_running' : 'job_already_finished';
    throw new MockHttpError(409, code, `Job ${job.id} has already ended: it is ${job.status}.`);
  }
  if (job.status === 'pending') return finishCancel(state, job);
  job.cancel_requested = true;
  job.updated_at = now();
  appendEvent(state, job.id, 'cancel_requested');
}

export function finishCancel(state: MockState, job: TrainingJob | DistillationJob) {
  if (isTerminalStatus(job.status)) return;
  const at = now();
  job.status = 'cancelled';
  job.cancel_requested = false;
  job.finished_at = at;
  job.updated_at = at;
  state.leases.delete(job.id);
  appendLog(state, job.id, 'cancelled');
  appendEvent(state, job.id, 'cancelled');
}

// benchmark and prompt_optimize jobs make no model
const OUTPUT_KIND: Record<
  Exclude<Schemas['TrainingJobType'], 'benchmark' | 'prompt_optimize'>,
  Schemas['Model']['kind']
> = {
  finetune: 'adapter',
  train: 'grown',
  contract: 'contracted',
  merge: 'merged',
};

/** Completes a job: outputs (unless a worker uploaded some), adapter, model, result. */
export function completeTrainingJob(
  state: MockState,
  job: TrainingJob,
  reported: Partial<Schemas['TrainingResult']> = {},
) {
  const at = now();
  job.status = 'completed';
  job.phase = 'done';
  job.progress = 100;
  job.finished_at = at;
  job.completed_at = at;
  job.updated_at = at;
  job.cancel_requested = false;
  state.leases.delete(job.id);
  const config = (job.config ?? {}) as Record<string, unknown>;
  const outputName = String(config.output_name ?? `${job.type}-${job.id.slice(-6)}`);
  const files = jobFiles(state, job.id);
  const params = baseModelParams(state, job.base_model);

  if (job.type !== 'benchmark' && job.type !== 'prompt_optimize') {
    if (files.size === 0) {
      const adapterStyle = job.type === 'finetune' && job.method !== 'full';
      const names = adapterStyle
        ? ['adapter_model.safetensors', 'adapter_config.json', 'training_config.json']
        : ['model.safetensors', 'config.json', 'training_config.json'];
      if (job.type === 'merge' && config.export_gguf) {
        const types = (config.quantization_types as string[] | undefined) ?? ['q8_0'];
        for (const q of types) names.push(`model-${q}.gguf`);
      }
      for (const name of names) files.set(name, storeFile(state, name, `${name} of ${job.id}\n`, 2048));
    }
    const outputs = [...files.values()].map((f) =>
      outputFile(f, job.id, `/v1/training/jobs/${job.id}/output/${f.name}`),
    );
    const kind = job.type === 'finetune' && job.method === 'full' ? 'full' : OUTPUT_KIND[job.type];
    const model: Schemas['Model'] = {
      id: newId(state, 'mdl'),
      job_id: job.id,
      name: outputName,
      kind,
      base_model: job.base_model ?? null,
      params,
      created_at: at,
      active: false,
      provider_model: null,
      ollama_name: null,
      imported_at: null,
      benchmark: null,
      files: outputs,
    };
    state.models.set(model.id, model);
    job.output_model_id = model.id;
    if (kind === 'adapter') {
      const adapter: Schemas['Adapter'] = {
        name: outputName,
        path: outputsDir(job.id),
        model_name: job.base_model ?? 'unknown',
        job_id: job.id,
        created_at: at,
        size_mb: round(outputs.reduce((sum, f) => sum + f.size_bytes, 0) / 1e6, 2),
        description: null,
        is_loaded: false,
        loaded_on: [],
        // flat, as the server shows it: the method, peft's LoRA names and the training settings
        training_config: {
          method: job.method ?? 'lora',
          r: job.config?.lora?.r,
          lora_alpha: job.config?.lora?.alpha,
          lora_dropout: job.config?.lora?.dropout,
          target_modules: job.config?.lora?.target_modules,
          bias: job.config?.lora?.bias,
          ...trainingConfig(job),
        },
        metrics: {
          final_loss: job.current_loss ?? null,
          training_steps: job.current_step,
          training_time_minutes: 1,
        },
        files: outputs,
      };
      state.adapters.set(adapter.name, adapter);
      job.adapter_name = adapter.name;
      job.adapter_path = adapter.path;
    }
  }

  const scores =
    job.type === 'benchmark'
      ? { perplexity: 12.5, coherence: 0.8, consistency: 0.75, helpfulness: 0.7 }
      : null;
  const sourceModelId = state.sourceModelIds.get(job.id);
  if (scores && sourceModelId) {
    const model = state.models.get(sourceModelId);
    if (model) model.benchmark = { scores, job_id: job.id, completed_at: at };
  }
  const tokens =
    job.current_step * (trainingConfig(job).batch_size ?? 4) * (trainingConfig(job).max_seq_length ?? 512);
  const paramsAfter =
    job.type === 'train'
      ? Math.round(params * 1.25)
      : job.type === 'contract'
        ? Math.round(params * 0.75)
        : params;
  state.results.set(job.id, {
    job_id: job.id,
    ppl_baseline: 24.0,
    ppl_final: 12.0,
    ppl_delta_pct: -50,
    loss_final: job.current_loss ?? null,
    eval_loss_final: null,
    params_before: params,
    params_after: paramsAfter,
    params_delta: paramsAfter - params,
    params_trainable:
      job.method === 'full' || job.type !== 'finetune' ? paramsAfter : Math.round(params * 0.01),
    function_preservation: job.type === 'train' ? 0 : null,
    gpu_seconds: job.current_step * 0.5,
    tokens_processed: tokens,
    cost_usd: job.cost_accrued ?? 0,
    scores,
    details: {},
    ...reported,
  });
  appendLog(state, job.id, `completed: ${outputName}`);
  appendEvent(state, job.id, 'completed', { output_model_id: job.output_model_id ?? null });
}

function baseModelParams(state: MockState, name: string | null | undefined): number {
  for (const model of state.baseModels.values()) if (model.name === name && model.params) return model.params;
  return 4_600_000;
}

// ------------------------------------------------------------------ distillation jobs

// The phases a distillation job walks through, one per tick.
const DISTILLATION_STAGES: readonly Schemas['DistillationPhase'][] = [
  'data_generation',
  'curation',
  'training',
  'export',
  'done',
];

export function tickDistillationJob(state: MockState, job: DistillationJob) {
  if (isTerminalStatus(job.status)) return;
  if (job.cancel_requested) return finishCancel(state, job);
  if (job.status === 'pending') return enterDistillationPhase(state, job, 'data_generation');
  const index = DISTILLATION_STAGES.indexOf(job.phase);
  let next = DISTILLATION_STAGES[index + 1] ?? 'done';
  if (next === 'export' && !distillationConfig(state, job).export_gguf) next = 'done';
  enterDistillationPhase(state, job, next);
}

export function advanceDistillationJob(state: MockState, job: DistillationJob, target: AdvanceTarget) {
  if (typeof target === 'object')
    throw new Error('Distillation jobs advance by phase or status, not by step.');
  switch (target) {
    case 'pending':
      return;
    case 'running':
      if (job.status === 'pending') enterDistillationPhase(state, job, 'data_generation');
      return;
    case 'completed':
    case 'done':
      return enterDistillationPhase(state, job, 'done');
    case 'failed': {
      const at = now();
      job.status = 'failed';
      job.error = { code: 'training_error', message: 'The mock worker failed this job.' };
      job.finished_at = at;
      job.updated_at = at;
      appendEvent(state, job.id, 'failed', { code: 'training_error' });
      return;
    }
    case 'cancelled':
      return finishCancel(state, job);
    default:
      if (
        !DISTILLATION_STAGES.includes(target as Schemas['DistillationPhase']) &&
        target !== 'initializing'
      ) {
        throw new Error(`${target} is not a distillation phase.`);
      }
      return enterDistillationPhase(state, job, target as Schemas['DistillationPhase']);
  }
}

type DistillationConfig = RequestBodyOf<'createDistillationJob'>['config'];

function distillationConfig(state: MockState, job: DistillationJob): DistillationConfig {
  return (
    state.distillationConfigs.get(job.id) ?? { teacher_model: 'local/unknown', student_model: 'unknown' }
  );
}

/** Moves a distillation job to `phase`, filling in the progress every earlier phase would have made. */
function enterDistillationPhase(state: MockState, job: DistillationJob, phase: Schemas['DistillationPhase']) {
  const config = distillationConfig(state, job);
  const at = now();
  const reach = (p: Schemas['DistillationPhase']) =>
    DISTILLATION_STAGES.indexOf(phase) >= DISTILLATION_STAGES.indexOf(p);
  const progress = job.progress as Record<string, number>;
  const promptsTotal = progress.prompts_total ?? 0;
  const trainingSteps = progress.training_steps ?? 0;
  if (job.status === 'pending') {
    job.status = 'running';
    job.started_at = at;
    appendEvent(state, job.id, 'claimed', { worker_id: 'mock-worker', attempt: 1 });
  }
  if (reach('curation') && !((progress.prompts_done ?? 0) >= promptsTotal)) {
    progress.prompts_done = promptsTotal;
    accrue(state, job, promptsTotal * (config.n_samples ?? 4) * COST_PER_TEACHER_SAMPLE);
  } else if (phase === 'data_generation') {
    progress.prompts_done = Math.floor(promptsTotal / 2);
  }
  if (reach('export') && (progress.training_step ?? 0) < trainingSteps) {
    accrue(state, job, (trainingSteps - (progress.training_step ?? 0)) * COST_PER_STEP);
    progress.training_step = trainingSteps;
  } else if (phase === 'training') {
    progress.training_step = Math.floor(trainingSteps / 2);
  }
  job.phase = phase;
  job.updated_at = at;
  appendEvent(state, job.id, 'phase', { phase });
  appendLog(state, job.id, `phase ${phase}`);
  if (phase === 'done') completeDistillationJob(state, job, config);
}

function completeDistillationJob(state: MockState, job: DistillationJob, config: DistillationConfig) {
  const at = now();
  job.status = 'completed';
  job.finished_at = at;
  job.updated_at = at;
  job.cancel_requested = false;
  state.leases.delete(job.id);
  const files = jobFiles(state, job.id);
  if (files.size === 0) {
    const names = ['adapter_model.safetensors', 'adapter_config.json', 'tokenizer.json', 'train_config.json'];
    const ggufTypes = config.export_gguf ? (config.quantization_types ?? ['q8_0']) : [];
    for (const q of ggufTypes) names.push(`model-${q}.gguf`);
    for (const name of names) files.set(name, storeFile(state, name, `${name} of ${job.id}\n`, 2048));
  }
  const promptsTotal = (job.progress as Record<string, number>).prompts_total ?? 0;
  job.results = {
    prompts_total: promptsTotal,
    samples_generated: promptsTotal * (config.n_samples ?? 4),
    pairs_kept: promptsTotal,
    loss_final: lossAt(config.training_steps ?? 100, config.training_steps ?? 100),
    steps: config.training_steps ?? 100,
    gguf: Object.fromEntries(
      [...files.values()]
        .filter((f) => f.name.endsWith('.gguf'))
        .map((f) => [
          /^model-(.+)\.gguf$/.exec(f.name)?.[1] ?? f.name,
          { name: f.name, size_bytes: f.bytes.length },
        ]),
    ),
  };
  appendEvent(state, job.id, 'completed');
}

/** The artifacts view of a distillation job. */
export function distillationArtifacts(
  state: MockState,
  job: DistillationJob,
): Schemas['DistillationArtifacts'] {
  const files = [...(state.outputs.get(job.id)?.values() ?? [])];
  const dir = outputsDir(job.id);
  const has = (name: string) => files.some((f) => f.name === name);
  const gguf: Record<string, string> = {};
  for (const f of files) {
    const match = /^model-(.+)\.gguf$/.exec(f.name);
    if (match?.[1]) gguf[match[1]] = `${dir}/${f.name}`;
  }
  return {
    job_id: job.id,
    adapter_path: has('adapter_model.safetensors') ? `${dir}/` : null,
    gguf_paths: gguf,
    tokenizer_path: has('tokenizer.json') ? `${dir}/tokenizer.json` : null,
    config_path: has('train_config.json') ? `${dir}/train_config.json` : null,
    files: files.map((f) => outputFile(f, job.id, `/v1/distillation/${job.id}/artifacts/${f.name}`)),
  };
}
