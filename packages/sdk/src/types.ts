// Public names for the spec's schemas and operation parameters. Every type is an alias of the
// generated one; none is declared here.

import type { QueryOf, RequestBodyOf } from './core/types.js';
import type { components } from './generated/api.js';

type Schemas = components['schemas'];

// ---- shared
export type ErrorBody = Schemas['Error'];
export type ErrorCode = Schemas['ErrorCode'];
export type JobStatus = Schemas['JobStatus'];
export type JobError = Schemas['JobError'];
export type Deleted = Schemas['Deleted'];
export type Health = Schemas['Health'];
export type Version = Schemas['Version'];
export type OutputFile = Schemas['OutputFile'];
export type QuantizationType = Schemas['QuantizationType'];

// ---- distillation
export type DistillationJob = Schemas['DistillationJob'];
export type DistillationConfig = Schemas['DistillationConfig'];
export type DistillationPhase = Schemas['DistillationPhase'];
export type DistillationArtifacts = Schemas['DistillationArtifacts'];
export type DistillationJobList = Schemas['DistillationJobList'];
export type DistillationJobCreateParams = RequestBodyOf<'createDistillationJob'>;
export type DistillationJobListParams = QueryOf<'listDistillationJobs'>;
export type DistillationEventListParams = QueryOf<'listDistillationJobEvents'>;
export type DistillationLogListParams = QueryOf<'listDistillationJobLogs'>;
export type DistillationMetricListParams = QueryOf<'listDistillationJobMetrics'>;
export type DistillationResumeParams = RequestBodyOf<'resumeDistillationJob'>;

// ---- training jobs
export type TrainingJob = Schemas['TrainingJob'];
export type TrainingJobType = Schemas['TrainingJobType'];
export type TrainingMethod = Schemas['TrainingMethod'];
export type TrainingPhase = Schemas['TrainingPhase'];
export type LoraConfig = Schemas['LoraConfig'];
export type TrainingConfig = Schemas['TrainingConfig'];
export type Hyperparams = Schemas['Hyperparams'];
export type TrainingJobList = Schemas['TrainingJobList'];
export type MergeResponse = Schemas['MergeResponse'];
export type LogLine = Schemas['LogLine'];
export type LogPage = Schemas['LogPage'];
export type MetricPoint = Schemas['MetricPoint'];
export type MetricPage = Schemas['MetricPage'];
export type JobEvent = Schemas['JobEvent'];
export type JobStreamStatus = Schemas['JobStreamStatus'];
export type JobStreamEnd = Schemas['JobStreamEnd'];
export type EventList = Schemas['EventList'];
export type TrainingResult = Schemas['TrainingResult'];
export type OutputList = Schemas['OutputList'];
export type Checkpoint = Schemas['Checkpoint'];
export type CheckpointList = Schemas['CheckpointList'];
export type TrainingJobCreateParams = RequestBodyOf<'createTrainingJob'>;
export type TrainingJobListParams = QueryOf<'listTrainingJobs'>;
export type ResumeParams = RequestBodyOf<'resumeTrainingJob'>;
export type MergeParams = RequestBodyOf<'mergeTrainingJob'>;
export type LogListParams = QueryOf<'listTrainingJobLogs'>;
export type MetricListParams = QueryOf<'listTrainingJobMetrics'>;
export type EventListParams = QueryOf<'listTrainingJobEvents'>;

// ---- templates and planning
export type Template = Schemas['Template'];
export type TemplateConfig = Schemas['TemplateConfig'];
export type TemplateList = Schemas['TemplateList'];
export type TemplateCreateParams = RequestBodyOf<'createTemplate'>;
export type TemplateListParams = QueryOf<'listTemplates'>;
export type Estimate = Schemas['Estimate'];
export type EstimateParams = RequestBodyOf<'estimateTraining'>;
export type Recommendation = Schemas['Recommendation'];
export type RecommendParams = RequestBodyOf<'recommendTraining'>;
export type TrainingStats = Schemas['TrainingStats'];
export type TrainingStatus = Schemas['TrainingStatus'];
export type AutoTrainingConfig = Schemas['AutoTrainingConfig'];
export type AutoTrainingConfigResponse = Schemas['AutoTrainingConfigResponse'];
export type AutoTrainingConfigUpdateParams = RequestBodyOf<'updateAutoTrainingConfig'>;

// ---- datasets and trajectories
export type Dataset = Schemas['Dataset'];
export type DatasetFormat = Schemas['DatasetFormat'];
export type DatasetRecord = Schemas['DatasetRecord'];
export type ChatMessage = Schemas['ChatMessage'];
export type DatasetList = Schemas['DatasetList'];
export type DatasetCreateParams = RequestBodyOf<'createDataset'>;
export type DatasetUploadFields = Omit<Schemas['DatasetUpload'], 'file'>;
export type DatasetBuildParams = RequestBodyOf<'buildDataset'>;
export type DatasetListParams = QueryOf<'listDatasets'>;
export type Trajectory = Schemas['Trajectory'];
export type TrajectorySummary = Schemas['TrajectorySummary'];
export type TrajectoryList = Schemas['TrajectoryList'];
export type LlmCall = Schemas['LlmCall'];
export type TrajectoryCreateParams = RequestBodyOf<'createTrajectory'>;
export type TrajectoryListParams = QueryOf<'listTrajectories'>;

// ---- adapters, models, budget
export type Adapter = Schemas['Adapter'];
export type AdapterList = Schemas['AdapterList'];
export type AdapterAction = Schemas['AdapterAction'];
export type AdapterListParams = QueryOf<'listAdapters'>;
export type BaseModel = Schemas['BaseModel'];
export type BaseModelList = Schemas['BaseModelList'];
export type BaseModelCreateParams = RequestBodyOf<'createBaseModel'>;
export type BaseModelListParams = QueryOf<'listBaseModels'>;
export type Model = Schemas['Model'];
export type ModelList = Schemas['ModelList'];
export type ModelListParams = QueryOf<'listModels'>;
export type ActivateModelParams = RequestBodyOf<'activateModel'>;
export type ActivateModelResponse = Schemas['ActivateModelResponse'];
export type OllamaImportParams = RequestBodyOf<'importModelToOllama'>;
export type OllamaImportResponse = Schemas['OllamaImportResponse'];
export type BenchmarkParams = RequestBodyOf<'benchmarkModel'>;
export type BenchmarkResponse = Schemas['BenchmarkResponse'];
export type Budget = Schemas['Budget'];

// ---- admin
export type ApiKey = Schemas['ApiKey'];
export type ApiKeyList = Schemas['ApiKeyList'];
export type CreatedApiKey = Schemas['CreatedApiKey'];
export type ApiKeyCreateParams = RequestBodyOf<'createApiKey'>;
export type ApiKeyListParams = QueryOf<'listApiKeys'>;
export type BudgetUpdateParams = RequestBodyOf<'updateBudget'>;

// ---- webhooks
export type Webhook = Schemas['Webhook'];
export type WebhookEvent = Schemas['WebhookEvent'];
export type WebhookList = Schemas['WebhookList'];
export type CreatedWebhook = Schemas['CreatedWebhook'];
export type WebhookCreateParams = RequestBodyOf<'createWebhook'>;
export type WebhookListParams = QueryOf<'listWebhooks'>;
export type WebhookDelivery = Schemas['WebhookDelivery'];
export type WebhookDeliveryList = Schemas['WebhookDeliveryList'];
