/** The OpenAI-compatible routes under `/openai/v1` (errors: ./errors.ts, mounted in app.ts). */
import type { Routes } from '../../http.js';
import { openAICompletionRoutes } from './completions.js';
import { openAIFileRoutes } from './files.js';
import { openAIFineTuningRoutes } from './fine-tuning.js';
import { openAIModelRoutes } from './models.js';

export const openAIRoutes: Routes = {
  ...openAIFileRoutes,
  ...openAIFineTuningRoutes,
  ...openAIModelRoutes,
  ...openAICompletionRoutes,
};
