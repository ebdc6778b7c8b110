import type { SealedSecrets } from '../secrets.js';

/** The two families of jobs sharing one queue table. */
export type JobKind = 'training' | 'distillation';
export type JobStatus = 'pending' | 'running' | 'completed' | 'failed' | 'cancelled';

/** One row of `jobs`, as the pg driver returns it (numeric columns come back as strings). */
export interface JobRow {
  id: string;
  tenant_id: string;
  kind: JobKind;
  type: string;
  method: string | null;
  status: JobStatus;
  phase: string;
  name: string | null;
  description: string | null;
  priority: number;
  config: Record<string, unknown>;
  /** Sealed hf_token / teacher_api_key; null when there are none or the job ended. */
  secrets: SealedSecrets | null;
  base_model: string | null;
  dataset_id: string | null;
  parent_job_id: string | null;
  model_id: string | null;
  required_device: 'cpu' | 'cuda' | 'mlx' | null;
  /** Workers the job runs on at once; > 1 is a gang (queue/gang.ts). */
  num_nodes: number;
  progress: Record<string, unknown>;
  results: Record<string, unknown>;
  metrics: Record<string, unknown>;
  current_step: number;
  total_steps: number | null;
  current_loss: number | null;
  learning_rate: number | null;
  attempt: number;
  retries: number;
  max_attempts: number;
  run_at: Date;
  lease_token: string | null;
  lease_owner: string | null;
  lease_expires_at: Date | null;
  cancel_requested: boolean;
  /** Set by a pause (a cancel that resumes from the start when no checkpoint was taken). */
  paused_at: Date | null;
  last_checkpoint_step: number;
  resume_checkpoint: string | null;
  output_model_id: string | null;
  adapter_name: string | null;
  cost_accrued: string | number;
  /** The estimate held against the tenant's budget while the job is pending or running. */
  cost_reserved: string | number;
  billed_until: Date | null;
  error_code: string | null;
  error_message: string | null;
  log_seq: number;
  event_seq: number;
  created_at: Date;
  updated_at: Date;
  started_at: Date | null;
  finished_at: Date | null;
}

/** What a report answers: how many items were new, and whether the owner asked to cancel. */
export interface ReportOutcome {
  accepted: number;
  cancel_requested: boolean;
}

/**
 * The columns a claim returns: what the claim answer (services/job-spec.ts) and its route read, and
 * what its completion's plan reads (OUTPUT_SOURCE_COLUMNS, kept by queue/leased-jobs.ts).
 */
export const CLAIMED_COLUMNS = [
  'id',
  'tenant_id',
  'kind',
  'type',
  'method',
  'status',
  'num_nodes',
  'attempt',
  'lease_token',
  'lease_expires_at',
  'log_seq',
  'config',
  'secrets',
  'base_model',
  'description',
  'dataset_id',
  'parent_job_id',
  'model_id',
  'resume_checkpoint',
] as const;

/** A file a job reads as data: its dataset's, its eval dataset's, or one the server prepared for it. */
export interface DataFileRow {
  source: 'dataset' | 'eval_dataset' | 'job_input';
  id: string;
  name: string;
  size_bytes: number | string;
  sha256: string;
}

/**
 * A job as a claim returns it (CLAIMED_COLUMNS), with the data files it reads when the claim
 * statement looked them up too (services/job-spec.ts dataFilesOf); absent, they are looked up.
 */
export type ClaimedJobRow = Pick<JobRow, (typeof CLAIMED_COLUMNS)[number]> & {
  data_files?: DataFileRow[] | null;
};

/** The columns a completion reads to decide what the job registers (services/registry.ts). */
export const OUTPUT_SOURCE_COLUMNS = [
  'id',
  'tenant_id',
  'type',
  'method',
  'status',
  'lease_token',
  'config',
  'base_model',
  'description',
  'dataset_id',
  'model_id',
] as const;

/** A job as a completion reads it (OUTPUT_SOURCE_COLUMNS), or as its claim read it (CLAIMED_COLUMNS). */
export type OutputSourceRow = Pick<JobRow, (typeof OUTPUT_SOURCE_COLUMNS)[number]>;
