// openapi-typescript (run with its defaults, as the repo's stale check does) marks every property that
// has a spec `default` as required, because a response always carries it. In a request those fields
// may be left out, and the server fills them in. This table names, per operation, the defaulted
// properties anywhere in its JSON request body; request types make exactly these optional.
// test/core/request-defaults.test.ts recomputes it from openapi/openapi.yaml and fails on any drift.
import type { operations } from '../generated/api.js';

export const DEFAULTED_REQUEST_FIELDS = {
  createDistillationJob: [
    'bond_beta',
    'bond_gamma',
    'export_gguf',
    'learning_rate',
    'lora_rank',
    'max_new_tokens',
    'n_samples',
    'num_prompts',
    'priority',
    'temperature',
    'training_steps',
  ],
  createTrainingJob: [
    'batch_size',
    'bf16',
    'bias',
    'contraction_ratio',
    'distributed',
    'eval_split',
    'eval_steps',
    'gradient_accumulation_steps',
    'learning_rate',
    'logging_steps',
    'lora_alpha',
    'lora_dropout',
    'lr_scheduler',
    'max_attempts',
    'max_seq_length',
    'max_steps',
    'num_epochs',
    'num_layers_to_contract',
    'num_nodes',
    'priority',
    'r',
    'save_steps',
    'seed',
    'target_modules',
    'task_type',
    'train_on_inputs',
    'turns',
    'use_gradient_checkpointing',
    'warmup_steps',
    'weight_decay',
  ],
  mergeTrainingJob: ['export_gguf'],
  createTemplate: [
    'batch_size',
    'bf16',
    'bias',
    'contraction_ratio',
    'eval_split',
    'eval_steps',
    'gradient_accumulation_steps',
    'learning_rate',
    'logging_steps',
    'lora_alpha',
    'lora_dropout',
    'lr_scheduler',
    'max_seq_length',
    'max_steps',
    'num_epochs',
    'num_layers_to_contract',
    'r',
    'save_steps',
    'seed',
    'target_modules',
    'task_type',
    'train_on_inputs',
    'turns',
    'use_gradient_checkpointing',
    'warmup_steps',
    'weight_decay',
  ],
  estimateTraining: [
    'batch_size',
    'gpu_memory_gb',
    'gpu_tflops',
    'lora_rank',
    'max_seq_length',
    'mfu',
    'num_epochs',
    'num_gpus',
    'use_gradient_checkpointing',
  ],
  buildDataset: ['limit', 'min_llm_calls_per_trajectory'],
  createTrajectory: ['source', 'status'],
  importModelToOllama: ['ollama_url'],
  benchmarkModel: ['max_examples'],
  claimJob: ['wait_seconds'],
  reportJobLogs: ['stream'],
  failJob: ['retryable'],
} as const satisfies Partial<Record<keyof operations, readonly string[]>>;

type Table = typeof DEFAULTED_REQUEST_FIELDS;

/** The defaulted request fields of operation `K`. */
export type DefaultedFields<K extends keyof operations> = K extends keyof Table ? Table[K][number] : never;

/** Every defaulted request field of any operation. */
export type AnyDefaultedField = Table[keyof Table][number];
