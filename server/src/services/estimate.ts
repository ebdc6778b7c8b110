/**
 * Planning arithmetic: memory and time of a training run, its cost, and a recommended starting
 * configuration. Pure functions of their inputs (no database), so every number can be re-derived
 * by hand from the `assumptions` an estimate returns.
 *
 * Model shape. Only the parameter count N is known, so the shape is inferred from the usual
 * decoder proportions: N ≈ 12·L·d² (4d² attention + 8d² MLP per layer) with d ≈ 128·L, which gives
 * L = ∛(N / 196 608) layers of width d = 128·L (Llama-7B: 32 × 4096; Llama-3.2-1B: 16 × 2048).
 */
import type { AppContext } from '../context.js';
import type { Schemas } from '../http.js';

export type Method = Schemas['TrainingMethod'];

/** Bytes of model weights per parameter, by method (mixed precision AdamW for `full`). */
const WEIGHT_BYTES: Record<Method, number> = {
  full: 4, // fp32 master weights, bf16 autocast for compute
  lora: 2, // frozen bf16 base
  qlora: 0.55, // NF4 4-bit base (0.5 B) + double-quantized block constants (~0.05 B)
};
/** Trainable weights (all of them for `full`, the LoRA adapters otherwise) are fp32. */
const GRAD_BYTES = 4;
/** AdamW keeps two fp32 moments per trainable parameter. */
const OPTIMIZER_BYTES = 8;
/** Saved activations per layer and token, in units of d bytes (Korthikanti et al. 2022, bf16, fused attention). */
const ACTIVATION_BYTES_PER_LAYER_TOKEN_D = 34;
/** With gradient checkpointing only each layer's bf16 input is kept (2·d bytes a token) plus one layer's full set. */
const CHECKPOINTED_BYTES_PER_LAYER_TOKEN_D = 2;
/** fp32 logits of an assumed 32k vocabulary. */
const VOCAB = 32_000;
const LOGIT_BYTES = 4;
/** Allocator fragmentation, CUDA context, temporary buffers. */
const OVERHEAD = 0.1;
/** Training FLOPs per parameter and token: forward 2N + backward 4N; LoRA skips frozen weight grads (2N). */
const FLOPS_PER_PARAM_TOKEN: Record<Method, number> = { full: 6, lora: 4, qlora: 4 };
/** Scoring (benchmarks) is a forward pass only. */
const INFERENCE_FLOPS_PER_PARAM_TOKEN = 2;
/** Gradient checkpointing re-runs the forward pass once more. */
const RECOMPUTE_FLOPS_PER_PARAM_TOKEN = 2;
/** Reference accelerator for job cost estimates: an A100's dense bf16 peak at a typical utilisation. */
const REFERENCE_TFLOPS = 312;
const REFERENCE_MFU = 0.35;
/**
 * USD per million tokens of a distillation's teacher: its price in `TUNERY_TEACHER_PRICES`, else the
 * `*` price, else 0. Local teachers run on the worker, whose time is billed as compute instead.
 */
export function teacherUsdPerMillionTokens(
  ctx: Pick<AppContext, 'config'>,
  teacherModel: string,
  provider: string,
): number {
  if (provider === 'local') return 0;
  const prices = ctx.config.teacherPrices;
  return prices[teacherModel] ?? prices['*'] ?? 0;
}
/** When a job's model has no known parameter count, cost is estimated as for a small (0.5B) model. */
export const DEFAULT_PARAMS = 500_000_000;

const GB = 1e9;
const round = (value: number, digits = 2) => Number(value.toFixed(digits));
/** Two significant digits: 7.04e-5 → 7e-5. */
const sig2 = (value: number) => Number(value.toPrecision(2));

/** Layers and width inferred from N (see the file comment). */
export function modelShape(params: number): { layers: number; hidden: number } {
  const layers = Math.max(1, Math.round(Math.cbrt(params / 196_608)));
  return { layers, hidden: 128 * layers };
}

/** LoRA on every linear layer: rank r on q,k,v,o (4 · r·2d) and the two MLP matrices (2 · r·5d) = 18·r·d a layer. */
export function loraTrainableParams(params: number, rank: number): number {
  const { layers, hidden } = modelShape(params);
  return 18 * rank * hidden * layers;
}

export interface EstimateInput {
  params: number;
  method: Method;
  batchSize: number;
  maxSeqLength: number;
  loraRank: number;
  numEpochs: number;
  /** > 0: a fixed number of optimizer steps instead of epochs. */
  maxSteps?: number | null;
  datasetTokens?: number | null;
  useGradientCheckpointing: boolean;
  gpuTflops: number;
  gpuMemoryGb: number;
  mfu: number;
  numGpus: number;
  pricePerGpuHour: number;
}

/** Memory (per GPU) and time of a run. Needs `datasetTokens` or `maxSteps > 0`. */
export function estimate(input: EstimateInput): Schemas['Estimate'] {
  const { params: n, method, batchSize: b, maxSeqLength: s, numGpus: gpus } = input;
  const { layers, hidden } = modelShape(n);
  const trainable = method === 'full' ? n : loraTrainableParams(n, input.loraRank);
  const adapterWeights = method === 'full' ? 0 : trainable * 4;

  const weights = n * WEIGHT_BYTES[method] + adapterWeights;
  const gradients = trainable * GRAD_BYTES;
  const optimizer = trainable * OPTIMIZER_BYTES;
  const tokensInFlight = b * s;
  const perLayer = input.useGradientCheckpointing
    ? CHECKPOINTED_BYTES_PER_LAYER_TOKEN_D * layers + ACTIVATION_BYTES_PER_LAYER_TOKEN_D
    : ACTIVATION_BYTES_PER_LAYER_TOKEN_D * layers;
  const activations = tokensInFlight * hidden * perLayer + tokensInFlight * VOCAB * LOGIT_BYTES;
  const total = (weights + gradients + optimizer + activations) * (1 + OVERHEAD);

  const tokensPerStep = b * s * gpus;
  let totalSteps: number;
  let totalTokens: number;
  if (input.maxSteps && input.maxSteps > 0) {
    totalSteps = input.maxSteps;
    totalTokens = totalSteps * tokensPerStep;
  } else {
    totalTokens = Math.ceil((input.datasetTokens ?? 0) * input.numEpochs);
    totalSteps = Math.max(1, Math.ceil(totalTokens / tokensPerStep));
  }
  const flopsPerToken =
    (FLOPS_PER_PARAM_TOKEN[method] + (input.useGradientCheckpointing ? RECOMPUTE_FLOPS_PER_PARAM_TOKEN : 0)) *
    n;
  const seconds = (flopsPerToken * totalTokens) / (input.gpuTflops * 1e12 * input.mfu * gpus);
  const cost = (seconds / 3600) * gpus * input.pricePerGpuHour;

  return {
    params: Math.round(n),
    trainable_params: Math.round(trainable),
    method,
    memory_gb: {
      weights: round(weights / GB),
      gradients: round(gradients / GB),
      optimizer: round(optimizer / GB),
      activations: round(activations / GB),
      total: round(total / GB),
    },
    fits: total / GB <= input.gpuMemoryGb,
    total_tokens: Math.round(totalTokens),
    total_steps: Math.round(totalSteps),
    estimated_seconds: round(seconds, 1),
    estimated_cost_usd: round(cost, 4),
    assumptions: [
      `Shape inferred from ${n} parameters: ${layers} layers of width ${hidden} (N ≈ 12·L·d², d ≈ 128·L).`,
      method === 'full'
        ? 'Full fine-tune: fp32 master weights (4 B/param), fp32 gradients (4 B/param), AdamW moments (8 B/param).'
        : `${method === 'qlora' ? 'QLoRA: 4-bit NF4 base (0.55 B/param)' : 'LoRA: frozen bf16 base (2 B/param)'}; rank-${input.loraRank} adapters on all linear layers (18·r·d·L = ${trainable} params) in fp32 with gradients and AdamW moments (16 B/param).`,
      input.useGradientCheckpointing
        ? `Activations with gradient checkpointing: 2·d bytes per layer and token plus one layer's 34·d, for batch ${b} × ${s} tokens, plus fp32 logits of a 32k vocabulary.`
        : `Activations: 34·d bytes per layer and token (bf16, fused attention), for batch ${b} × ${s} tokens, plus fp32 logits of a 32k vocabulary.`,
      'Total memory is per GPU (data parallel) and adds 10% for allocator and CUDA overhead.',
      input.maxSteps && input.maxSteps > 0
        ? `Tokens: ${input.maxSteps} steps × ${b} × ${s} tokens × ${gpus} GPU(s) (packed sequences).`
        : `Tokens: ${input.datasetTokens} dataset tokens × ${input.numEpochs} epochs; steps of ${b} × ${s} tokens × ${gpus} GPU(s).`,
      `Compute: ${FLOPS_PER_PARAM_TOKEN[method]}·N FLOPs a token${input.useGradientCheckpointing ? ' + 2·N to recompute activations' : ''}, at ${input.gpuTflops} TFLOP/s × ${input.mfu} MFU × ${gpus} GPU(s).`,
      `Cost at $${input.pricePerGpuHour} per GPU-hour.`,
    ],
  };
}

/**
 * A job's expected cost for budget checks: its compute on the reference accelerator at the server's
 * price per GPU-hour, plus teacher tokens for distillation. Unknown models count as 0.5B parameters.
 * `method` is a training method (`lora`, `qlora`; anything else trains every weight) or `inference`
 * for forward-only work such as benchmarks.
 */
export function estimateJobCostUsd(
  ctx: Pick<AppContext, 'config'>,
  input: {
    params: number | null;
    method: string | null;
    totalTokens: number;
    teacherTokens?: number;
    teacherUsdPerMillionTokens?: number;
  },
): number {
  const n = input.params && input.params > 0 ? input.params : DEFAULT_PARAMS;
  const flopsPerParamToken =
    input.method === 'inference'
      ? INFERENCE_FLOPS_PER_PARAM_TOKEN
      : FLOPS_PER_PARAM_TOKEN[input.method === 'lora' || input.method === 'qlora' ? input.method : 'full'];
  const flops = flopsPerParamToken * n * Math.max(0, input.totalTokens);
  const seconds = flops / (REFERENCE_TFLOPS * 1e12 * REFERENCE_MFU);
  const compute = (seconds / 3600) * ctx.config.pricePerGpuHour;
  const teacher = (Math.max(0, input.teacherTokens ?? 0) * (input.teacherUsdPerMillionTokens ?? 0)) / 1e6;
  return round(compute + teacher, 6);
}

// ------------------------------------------------------------------ recommendations

export interface RecommendInput {
  params: number;
  datasetTokens: number;
  /** The model's context length, when the catalog knows it (caps the sequence-length window). */
  contextLength?: number | null;
}

/** Learning rate at the 7B reference point (seed 002's example), scaled by 1/√N. */
const REFERENCE_LR = 7e-5;
const REFERENCE_PARAMS = 7e9;
const RECOMMENDED_BATCH = 4;
const RECOMMENDED_SEQ_LEN = 256;
const STEPS_PER_CYCLE_TARGET = 1000;

const human = (value: number) =>
  value >= 1e9
    ? `${sig2(value / 1e9)}B`
    : value >= 1e6
      ? `${sig2(value / 1e6)}M`
      : value >= 1e3
        ? `${sig2(value / 1e3)}k`
        : `${value}`;

/** Rounds a step count to a readable number: to 100 from 1000 steps, to 10 from 100. */
function roundSteps(steps: number): number {
  if (steps >= 1000) return Math.round(steps / 100) * 100;
  if (steps >= 100) return Math.round(steps / 10) * 10;
  return Math.max(1, Math.round(steps));
}

/**
 * A starting configuration with safe windows. Learning rate lr = 7e-5 · √(7e9 / N), clamped to
 * [1e-5, 1e-3]; epochs 3 below 50M dataset tokens, 2 below 500M, else 1; steps = epochs · tokens /
 * (batch 4 · seq 256), split into cycles of ≈1000 steps; LoRA rank 16 up to 1.5B parameters, 32 up
 * to 15B, else 64.
 */
export function recommend(input: RecommendInput): Schemas['Recommendation'] {
  const n = input.params;
  const tokens = input.datasetTokens;
  const lr = sig2(Math.min(1e-3, Math.max(1e-5, REFERENCE_LR * Math.sqrt(REFERENCE_PARAMS / n))));
  const epochs = tokens < 50e6 ? 3 : tokens < 500e6 ? 2 : 1;
  const totalSteps = Math.max(1, Math.ceil((epochs * tokens) / (RECOMMENDED_BATCH * RECOMMENDED_SEQ_LEN)));
  const cycles = Math.max(1, Math.round(totalSteps / STEPS_PER_CYCLE_TARGET));
  const stepsPerCycle = roundSteps(totalSteps / cycles);
  const loraRank = n <= 1.5e9 ? 16 : n <= 15e9 ? 32 : 64;
  const maxSeq = Math.max(RECOMMENDED_SEQ_LEN, Math.min(2048, input.contextLength ?? 2048));

  return {
    model_params: Math.round(n),
    dataset_tokens_est: Math.round(tokens),
    recommended: {
      turns: 2,
      lr,
      cycles,
      steps_per_cycle: stepsPerCycle,
      seq_len: RECOMMENDED_SEQ_LEN,
      lora_rank: loraRank,
      batch_size: RECOMMENDED_BATCH,
      num_epochs: epochs,
    },
    windows: {
      turns: { min: 1, max: 3 },
      lr: { min: sig2(lr / 2), max: sig2(lr * 2) },
      cycles: {
        min: Math.max(1, Math.floor(cycles / 2)),
        max: Math.max(cycles + 1, Math.round((cycles * 5) / 3)),
      },
      steps_per_cycle: { min: Math.max(1, Math.round(stepsPerCycle / 2)), max: stepsPerCycle * 2 },
      seq_len: { min: 128, max: maxSeq },
      lora_rank: { min: Math.max(4, loraRank / 2), max: loraRank * 4 },
      batch_size: { min: 1, max: 16 },
      num_epochs: { min: 1, max: epochs + 2 },
    },
    notes: [
      `≈${epochs} epoch${epochs === 1 ? '' : 's'} over your ~${human(tokens)}-token dataset (${totalSteps} steps of ${RECOMMENDED_BATCH} × ${RECOMMENDED_SEQ_LEN} tokens)`,
      `Learning rate tuned for a ~${human(n)} model (7e-5 at 7B, scaled by 1/√params)`,
      `LoRA rank ${loraRank} for a model of this size (fine-tunes); turns, cycles and steps_per_cycle drive grow runs`,
    ],
    disclaimer: 'Recommended starting points — tune within the window for your model and data.',
  };
}
