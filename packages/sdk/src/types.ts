// Public names for the spec's schemas and operation parameters. Object types are interfaces that
// extend the generated schema (so editors and typedoc show `TrainingJob` with its fields, not
// `components["schemas"]["TrainingJob"]`); enums and unions stay aliases. No field is declared here:
// the create-params union below only picks and requires fields of the spec's request body.

import type { QueryOf, RequestBodyOf } from './core/types.js';
import type { components } from './generated/api.js';

type Schemas = components['schemas'];
/** Named so that interfaces can extend a schema (an indexed access type cannot be extended directly). */
type Schema<K extends keyof Schemas> = Schemas[K];

// ---- shared
export interface ErrorBody extends Schema<'Error'> {}
export type ErrorCode = Schemas['ErrorCode'];
export type JobStatus = Schemas['JobStatus'];
export type JobError = Schemas['JobError'];
export interface Deleted extends Schema<'Deleted'> {}
export interface Health extends Schema<'Health'> {}
export interface Version extends Schema<'Version'> {}
export interface OutputFile extends Schema<'OutputFile'> {}
export type QuantizationType = Schemas['QuantizationType'];

// ---- distillation
export interface DistillationJob extends Schema<'DistillationJob'> {}
export interface DistillationConfig extends Schema<'DistillationConfig'> {}
export type DistillationPhase = Schemas['DistillationPhase'];
export interface DistillationArtifacts extends Schema<'DistillationArtifacts'> {}
export interface DistillationJobList extends Schema<'DistillationJobList'> {}
export interface DistillationJobCreateParams extends RequestBodyOf<'createDistillationJob'> {}
export interface DistillationJobListParams extends QueryOf<'listDistillationJobs'> {}
export interface DistillationEventListParams extends QueryOf<'listDistillationJobEvents'> {}
export interface DistillationLogListParams extends QueryOf<'listDistillationJobLogs'> {}
export interface DistillationMetricListParams extends QueryOf<'listDistillationJobMetrics'> {}
export interface DistillationResumeParams extends RequestBodyOf<'resumeDistillationJob'> {}

// ---- training jobs
export interface TrainingJob extends Schema<'TrainingJob'> {}
export type TrainingJobType = Schemas['TrainingJobType'];
export type TrainingMethod = Schemas['TrainingMethod'];
export type TrainingPhase = Schemas['TrainingPhase'];
export interface LoraConfig extends Schema<'LoraConfig'> {}
export interface TrainingConfig extends Schema<'TrainingConfig'> {}
export interface Hyperparams extends Schema<'Hyperparams'> {}
export interface TrainingJobList extends Schema<'TrainingJobList'> {}
export interface MergeResponse extends Schema<'MergeResponse'> {}
export interface LogLine extends Schema<'LogLine'> {}
export interface LogPage extends Schema<'LogPage'> {}
export interface MetricPoint extends Schema<'MetricPoint'> {}
export interface MetricPage extends Schema<'MetricPage'> {}
export interface JobEvent extends Schema<'JobEvent'> {}
export interface JobStreamStatus extends Schema<'JobStreamStatus'> {}
export interface JobStreamEnd extends Schema<'JobStreamEnd'> {}
export interface EventList extends Schema<'EventList'> {}
export interface TrainingResult extends Schema<'TrainingResult'> {}
export interface OutputList extends Schema<'OutputList'> {}
export interface Checkpoint extends Schema<'Checkpoint'> {}
export interface CheckpointList extends Schema<'CheckpointList'> {}
/**
 * Everything `POST /v1/training/jobs` accepts, seed spellings included (flat `lora_rank`, nested
 * `lora_config`, `hyperparams`…). The SDK's `create` takes the stricter {@link TrainingJobCreateParams}.
 */
export interface TrainingJobCreateBody extends RequestBodyOf<'createTrainingJob'> {}

/** Exactly one of the keys of `T`: the others are `never`, so giving two is a compile error. */
type ExactlyOne<T> = { [K in keyof T]: Pick<T, K> & { [O in Exclude<keyof T, K>]?: never } }[keyof T];

/** Fields every job type takes (a prompt optimization only the first four). */
type BasicOptions = Pick<TrainingJobCreateBody, 'idempotency_key' | 'run_name' | 'priority' | 'max_attempts'>;
type JobOptions = BasicOptions &
  Pick<TrainingJobCreateBody, 'template' | 'wandb_project' | 'hf_token'> & {
    /** Pins the worker device (`mlx` only while a worker announces it). */
    backend?: Exclude<TrainingJobCreateBody['backend'], 'native'>;
  };
/** The one training setting every type reads. */
type SeedOnly = { training_config?: Pick<TrainingConfig, 'seed'> };
/** The model trained on: a catalog name or hub id, a catalog id, or one of your output models. */
type ModelSource = ExactlyOne<
  Required<Pick<TrainingJobCreateBody, 'base_model' | 'base_model_id' | 'source_model_id'>>
>;
/** The data trained on: a dataset, a dataset file, or inline texts. */
type TrainingData = ExactlyOne<
  Required<Pick<TrainingJobCreateBody, 'dataset_id' | 'dataset_path' | 'train_texts'>>
>;
/** None: the tenant's newest dataset (seed 004), or none at all where the type needs no data. */
type NoData = { [K in keyof TrainingData]?: never };
/** `T` and no other field of the body: another spelling of a setting is a compile error, literal or not. */
type Only<T> = T & { [K in Exclude<keyof TrainingJobCreateBody, keyof T>]?: never };
/** The `hyperparams` keys `K`, and no other. */
type Hyperparam<K extends keyof Hyperparams> = {
  hyperparams?: Pick<Hyperparams, K> & { [O in Exclude<keyof Hyperparams, K>]?: never };
};

/**
 * A LoRA/QLoRA/full fine-tune (the default type). Settings are nested: `lora_config`,
 * `training_config`. Without data it trains on your newest dataset.
 */
export type FinetuneJobParams = Only<
  JobOptions &
    ModelSource &
    (TrainingData | NoData) & { type?: 'finetune' } & Pick<
      TrainingJobCreateBody,
      | 'method'
      | 'lora_config'
      | 'training_config'
      | 'eval_split'
      | 'eval_dataset_id'
      | 'output_name'
      | 'distributed'
      | 'num_nodes'
    >
>;

/** Grows a model, function-preserving (`hyperparams.turns`, `cycles`, `new_layers`…); data as a fine-tune's. */
export type GrowJobParams = Only<
  JobOptions &
    SeedOnly &
    ModelSource &
    (TrainingData | NoData) & { type: 'train' } & Pick<
      TrainingJobCreateBody,
      'output_name' | 'eval_dataset_id'
    > &
    Hyperparam<'turns' | 'cycles' | 'steps_per_cycle' | 'lr' | 'seq_len' | 'new_layers'>
>;

/** Prunes layers of a model (`hyperparams.contraction_ratio`, `num_layers_to_contract`); data optional. */
export type ContractJobParams = Only<
  JobOptions &
    SeedOnly &
    ModelSource &
    (TrainingData | NoData) & { type: 'contract' } & Pick<TrainingJobCreateBody, 'output_name'> &
    Hyperparam<'contraction_ratio' | 'num_layers_to_contract'>
>;

/** Merges the adapter of a completed LoRA job (`parent_job_id`) into its base model. */
export type MergeJobParams = Only<
  JobOptions &
    SeedOnly & { type: 'merge' } & Required<Pick<TrainingJobCreateBody, 'parent_job_id'>> &
    Pick<TrainingJobCreateBody, 'output_name'>
>;

/** Scores one of your output models on a dataset. */
export type BenchmarkJobParams = Only<
  JobOptions &
    SeedOnly & { type: 'benchmark' } & Required<Pick<TrainingJobCreateBody, 'source_model_id'>> &
    TrainingData
>;

/**
 * Optimizes the system prompt of `base_model` at the teacher endpoint on `dataset_id` (your newest
 * dataset when omitted), seed 004's `native` backend.
 */
export type PromptOptimizeJobParams = Only<
  BasicOptions & { backend: 'native'; type?: never } & Required<
      Pick<TrainingJobCreateBody, 'base_model' | 'prompt_optimization'>
    > &
    Pick<TrainingJobCreateBody, 'dataset_id' | 'max_steps'>
>;

/**
 * A new training job, one variant per `type`, each with its required fields required and one
 * spelling per setting. `create({})`, two data sources (say `dataset_id` and `train_texts`) or a
 * field the type does not use do not compile.
 */
export type TrainingJobCreateParams =
  | FinetuneJobParams
  | GrowJobParams
  | ContractJobParams
  | MergeJobParams
  | BenchmarkJobParams
  | PromptOptimizeJobParams;
export interface TrainingJobListParams extends QueryOf<'listTrainingJobs'> {}
export interface ResumeParams extends RequestBodyOf<'resumeTrainingJob'> {}
export interface MergeParams extends RequestBodyOf<'mergeTrainingJob'> {}
export interface LogListParams extends QueryOf<'listTrainingJobLogs'> {}
export interface MetricListParams extends QueryOf<'listTrainingJobMetrics'> {}
export interface EventListParams extends QueryOf<'listTrainingJobEvents'> {}

// ---- templates and planning
export interface Template extends Schema<'Template'> {}
export interface TemplateConfig extends Schema<'TemplateConfig'> {}
export interface TemplateList extends Schema<'TemplateList'> {}
export interface TemplateCreateParams extends RequestBodyOf<'createTemplate'> {}
export interface TemplateListParams extends QueryOf<'listTemplates'> {}
export interface Estimate extends Schema<'Estimate'> {}
export interface EstimateParams extends RequestBodyOf<'estimateTraining'> {}
export interface Recommendation extends Schema<'Recommendation'> {}
export interface RecommendParams extends RequestBodyOf<'recommendTraining'> {}
export interface TrainingStats extends Schema<'TrainingStats'> {}
export interface TrainingStatus extends Schema<'TrainingStatus'> {}
export interface AutoTrainingConfig extends Schema<'AutoTrainingConfig'> {}
export interface AutoTrainingConfigResponse extends Schema<'AutoTrainingConfigResponse'> {}
export interface AutoTrainingConfigUpdateParams extends RequestBodyOf<'updateAutoTrainingConfig'> {}

// ---- datasets and trajectories
export interface Dataset extends Schema<'Dataset'> {}
export type DatasetFormat = Schemas['DatasetFormat'];
export type DatasetRecord = Schemas['DatasetRecord'];
export interface ChatMessage extends Schema<'ChatMessage'> {}
export interface DatasetList extends Schema<'DatasetList'> {}
export interface DatasetCreateParams extends RequestBodyOf<'createDataset'> {}
export type DatasetUploadFields = Omit<Schemas['DatasetUpload'], 'file'>;
export interface DatasetBuildParams extends RequestBodyOf<'buildDataset'> {}
export interface DatasetListParams extends QueryOf<'listDatasets'> {}
export interface Trajectory extends Schema<'Trajectory'> {}
export interface TrajectorySummary extends Schema<'TrajectorySummary'> {}
export interface TrajectoryList extends Schema<'TrajectoryList'> {}
export interface LlmCall extends Schema<'LlmCall'> {}
export interface TrajectoryCreateParams extends RequestBodyOf<'createTrajectory'> {}
export interface TrajectoryListParams extends QueryOf<'listTrajectories'> {}

// ---- adapters, models, budget
export interface Adapter extends Schema<'Adapter'> {}
export interface AdapterList extends Schema<'AdapterList'> {}
export interface AdapterAction extends Schema<'AdapterAction'> {}
export interface AdapterListParams extends QueryOf<'listAdapters'> {}
export interface BaseModel extends Schema<'BaseModel'> {}
export interface BaseModelList extends Schema<'BaseModelList'> {}
export interface BaseModelCreateParams extends RequestBodyOf<'createBaseModel'> {}
export interface BaseModelListParams extends QueryOf<'listBaseModels'> {}
export interface Model extends Schema<'Model'> {}
export interface ModelList extends Schema<'ModelList'> {}
export interface ModelListParams extends QueryOf<'listModels'> {}
export interface ActivateModelParams extends RequestBodyOf<'activateModel'> {}
export interface ActivateModelResponse extends Schema<'ActivateModelResponse'> {}
export interface OllamaImportParams extends RequestBodyOf<'importModelToOllama'> {}
export interface OllamaImportResponse extends Schema<'OllamaImportResponse'> {}
export interface BenchmarkParams extends RequestBodyOf<'benchmarkModel'> {}
export interface BenchmarkResponse extends Schema<'BenchmarkResponse'> {}
export interface Budget extends Schema<'Budget'> {}

// ---- admin
export interface ApiKey extends Schema<'ApiKey'> {}
export interface ApiKeyList extends Schema<'ApiKeyList'> {}
export interface CreatedApiKey extends Schema<'CreatedApiKey'> {}
export interface ApiKeyCreateParams extends RequestBodyOf<'createApiKey'> {}
export interface ApiKeyListParams extends QueryOf<'listApiKeys'> {}
export interface BudgetUpdateParams extends RequestBodyOf<'updateBudget'> {}

// ---- webhooks
export interface Webhook extends Schema<'Webhook'> {}
export type WebhookEvent = Schemas['WebhookEvent'];
export interface WebhookList extends Schema<'WebhookList'> {}
export interface CreatedWebhook extends Schema<'CreatedWebhook'> {}
export interface WebhookCreateParams extends RequestBodyOf<'createWebhook'> {}
export interface WebhookListParams extends QueryOf<'listWebhooks'> {}
export interface WebhookDelivery extends Schema<'WebhookDelivery'> {}
export interface WebhookDeliveryList extends Schema<'WebhookDeliveryList'> {}

// ---- inference (OpenAI-compatible)
export interface ChatCompletion extends Schema<'OpenAIChatCompletion'> {}
export interface ChatCompletionChunk extends Schema<'OpenAIChatCompletionChunk'> {}
export type ChatCompletionCreateParams = RequestBodyOf<'createOpenAIChatCompletion'>;
export type ChatMessageParam = Schemas['OpenAIChatMessage'];
