/** The phases a training job moves through (the spec's TrainingPhase). */
export const TRAINING_PHASES = [
  'queued',
  'initializing',
  'loading_model',
  'data_preparation',
  'training',
  'evaluating',
  'saving',
  'merging',
  'growing',
  'contracting',
  'export',
  'done',
] as const;

/** The phases of a distillation job (the spec's DistillationPhase). */
export const DISTILLATION_PHASES = [
  'initializing',
  'data_generation',
  'curation',
  'training',
  'export',
  'done',
] as const;

export const isKnownPhase = (phase: string): boolean =>
  (TRAINING_PHASES as readonly string[]).includes(phase) ||
  (DISTILLATION_PHASES as readonly string[]).includes(phase);
