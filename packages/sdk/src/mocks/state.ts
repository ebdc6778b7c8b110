// The in-memory fake behind the mock handlers: plain Maps a test can read and edit directly.
import type { RequestBodyOf } from '../core/types.js';
import type { components, operations } from '../generated/api.js';

type Schemas = components['schemas'];

export type OperationId = keyof operations;

/** A request the mock server answered, for assertions (`mock.state.requests`). */
export interface RecordedRequest {
  operationId: OperationId;
  method: string;
  url: string;
  headers: Record<string, string>;
}

/** A stored file: an output, an artifact, a checkpoint, or a dataset's JSONL. */
export interface StoredBytes {
  id: string;
  name: string;
  bytes: Uint8Array;
  sha256: string;
  createdAt: string;
}

/** Lease of a job claimed through the worker endpoints. */
export interface Lease {
  token: string;
  workerId: string;
  expiresAt: number;
}

export interface IdempotentResult {
  fingerprint: string;
  kind:
    | 'trainingJob'
    | 'distillationJob'
    | 'dataset'
    | 'trajectory'
    | 'template'
    | 'baseModel'
    | 'benchmark'
    | 'webhook';
  id: string;
}

export interface MockState {
  tenantId: string;
  distillationJobs: Map<string, Schemas['DistillationJob']>;
  /** Secrets and inputs of each distillation job (never returned by the API). */
  distillationConfigs: Map<string, RequestBodyOf<'createDistillationJob'>['config']>;
  /** A training job's source model (`source_model_id`), which the server keeps off the job's view. */
  sourceModelIds: Map<string, string>;
  trainingJobs: Map<string, Schemas['TrainingJob']>;
  logs: Map<string, Schemas['LogLine'][]>;
  metrics: Map<string, Schemas['MetricPoint'][]>;
  events: Map<string, Schemas['JobEvent'][]>;
  checkpoints: Map<string, (Schemas['Checkpoint'] & { fileId: string })[]>;
  /** Output files (training) and artifacts (distillation) by job id, then file name. */
  outputs: Map<string, Map<string, StoredBytes>>;
  results: Map<string, Schemas['TrainingResult']>;
  templates: Map<string, Schemas['Template']>;
  datasets: Map<string, Schemas['Dataset']>;
  /** Every stored file by id (datasets' JSONL, outputs, checkpoints): what workers download. */
  files: Map<string, StoredBytes>;
  datasetFiles: Map<string, string>;
  trajectories: Map<string, Schemas['Trajectory']>;
  adapters: Map<string, Schemas['Adapter']>;
  models: Map<string, Schemas['Model']>;
  baseModels: Map<string, Schemas['BaseModel']>;
  budget: { limit_usd: number | null; spent_usd: number };
  /** API keys made through the admin API (their secrets are not kept). */
  apiKeys: Map<string, Schemas['ApiKey']>;
  webhooks: Map<string, Schemas['CreatedWebhook']>;
  autoConfig: Schemas['AutoTrainingConfig'];
  idempotency: Map<string, IdempotentResult>;
  leases: Map<string, Lease>;
  /** Bytes received of unfinished (Content-Range) worker uploads, by `job/kind/name`. */
  uploadParts: Map<string, Uint8Array>;
  /** Workers seen recently, as reported by `GET /v1/training/status`. */
  workersOnline: number;
  /** Whether import-ollama reaches Ollama (false: 502 ollama_unreachable). */
  ollamaReachable: boolean;
  requests: RecordedRequest[];
  /** Counter behind the ids the fake hands out. */
  nextId: number;
}

export const BUILTIN_TEMPLATES: readonly Schemas['Template'][] = [
  {
    name: 'lora-default',
    description: 'LoRA fine-tune with rank 16 and a cosine schedule.',
    builtin: true,
    config: {
      type: 'finetune',
      method: 'lora',
      lora_config: { r: 16, lora_alpha: 32, lora_dropout: 0.05 },
      training_config: { num_epochs: 3, batch_size: 4, learning_rate: 0.0002, lr_scheduler: 'cosine' },
    },
    created_at: '2026-01-01T00:00:00Z',
  },
  {
    name: 'qlora-large',
    description: 'QLoRA for models that do not fit in bf16 (CUDA workers only).',
    builtin: true,
    config: {
      type: 'finetune',
      method: 'qlora',
      lora_config: { r: 64, lora_alpha: 16 },
      training_config: { batch_size: 1, gradient_accumulation_steps: 16, use_gradient_checkpointing: true },
    },
    created_at: '2026-01-01T00:00:00Z',
  },
];

export const BUILTIN_BASE_MODELS: readonly Schemas['BaseModel'][] = [
  {
    id: 'bm_tinyllama',
    name: 'tiny-llama',
    source: 'tunery/tiny-llama',
    params: 4_600_000,
    architecture: 'llama',
    context_length: 2048,
    builtin: true,
    created_at: '2026-01-01T00:00:00Z',
  },
];

export function createState(tenantId = 'default'): MockState {
  return {
    tenantId,
    distillationJobs: new Map(),
    distillationConfigs: new Map(),
    sourceModelIds: new Map(),
    trainingJobs: new Map(),
    logs: new Map(),
    metrics: new Map(),
    events: new Map(),
    checkpoints: new Map(),
    outputs: new Map(),
    results: new Map(),
    templates: new Map(BUILTIN_TEMPLATES.map((t) => [t.name, structuredClone(t)])),
    datasets: new Map(),
    files: new Map(),
    datasetFiles: new Map(),
    trajectories: new Map(),
    adapters: new Map(),
    models: new Map(),
    baseModels: new Map(BUILTIN_BASE_MODELS.map((m) => [m.id, structuredClone(m)])),
    budget: { limit_usd: null, spent_usd: 0 },
    apiKeys: new Map(),
    webhooks: new Map(),
    autoConfig: {
      enabled: false,
      threshold: 100,
      cooldown_hours: 24,
      base_model: null,
      last_run_at: null,
      last_job_id: null,
      trajectories_since_last_run: 0,
    },
    idempotency: new Map(),
    leases: new Map(),
    uploadParts: new Map(),
    workersOnline: 1,
    ollamaReachable: true,
    requests: [],
    nextId: 1,
  };
}

/** A fresh id with the given prefix, e.g. `job_000000000000000000000007`. */
export function newId(state: MockState, prefix: string): string {
  return `${prefix}_${(state.nextId++).toString(16).padStart(24, '0')}`;
}

export function now(): string {
  return new Date().toISOString();
}
