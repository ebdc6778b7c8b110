import type { Routes } from '../http.js';
import { adapterRoutes } from './adapters.js';
import { adminRoutes } from './admin.js';
import { budgetRoutes } from './budget.js';
import { datasetRoutes } from './datasets.js';
import { distillationRoutes } from './distillation.js';
import { inferenceWorkerRoutes } from './inference-workers.js';
import { metaRoutes } from './meta.js';
import { modelRoutes } from './models.js';
import { openAIRoutes } from './openai/index.js';
import { planningRoutes } from './planning.js';
import { templateRoutes } from './templates.js';
import { trainingJobRoutes } from './training-jobs.js';
import { trajectoryRoutes } from './trajectories.js';
import { webhookRoutes } from './webhooks.js';
import { workerRoutes } from './workers.js';

/** operationId → handler, for every operation in the spec. */
export const allRoutes: Routes = {
  ...metaRoutes,
  ...distillationRoutes,
  ...trainingJobRoutes,
  ...templateRoutes,
  ...planningRoutes,
  ...datasetRoutes,
  ...trajectoryRoutes,
  ...adapterRoutes,
  ...modelRoutes,
  ...budgetRoutes,
  ...adminRoutes,
  ...webhookRoutes,
  ...workerRoutes,
  ...inferenceWorkerRoutes,
  ...openAIRoutes,
};
