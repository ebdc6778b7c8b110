// Type-level checks (tsc runs them in `pnpm build`; vitest only runs the trivial assertions).
import { describe, expectTypeOf, it } from 'vitest';
import type { SuccessBody } from '../../src/core/types.js';
import type {
  APIError,
  components,
  DistillationJob,
  DistillationJobCreateParams,
  ErrorCode,
  JobWaitTimeoutError,
  operations,
  Page,
  TrainingJob,
  TrainingJobCreateParams,
  Tunery,
} from '../../src/index.js';

describe('types derived from the spec', () => {
  it('resolve responses to the spec schemas', () => {
    expectTypeOf<SuccessBody<operations['getTrainingJob']>>().toEqualTypeOf<
      components['schemas']['TrainingJob']
    >();
    expectTypeOf<SuccessBody<operations['benchmarkModel']>>().toEqualTypeOf<
      components['schemas']['BenchmarkResponse']
    >();
    expectTypeOf<Awaited<ReturnType<Tunery['training']['jobs']['retrieve']>>>().toEqualTypeOf<TrainingJob>();
    expectTypeOf<Awaited<ReturnType<Tunery['training']['jobs']['list']>>>().toEqualTypeOf<
      Page<'jobs', TrainingJob, components['schemas']['TrainingJobList']>
    >();
    expectTypeOf<Awaited<ReturnType<Tunery['training']['jobs']['download']>>>().toEqualTypeOf<
      ReadableStream<Uint8Array>
    >();
  });

  it('leave fields the server defaults optional in requests, and required ones required', () => {
    expectTypeOf<{ base_model: 'x'; train_texts: ['a'] }>().toExtend<TrainingJobCreateParams>();
    expectTypeOf<{
      base_model: 'x';
      dataset_id: 'ds_1';
      lora_config: { r: 8 };
      training_config: { max_steps: 3 };
    }>().toExtend<TrainingJobCreateParams>();
    expectTypeOf<{
      config: { teacher_model: 'openai/gpt-4o'; student_model: 's' };
    }>().toExtend<DistillationJobCreateParams>();
    expectTypeOf<{
      config: { teacher_model: 'openai/gpt-4o' };
    }>().not.toExtend<DistillationJobCreateParams>();
    expectTypeOf<{ name: 'n' }>().not.toExtend<NonNullable<Parameters<Tunery['baseModels']['create']>[0]>>();
  });

  it('leave defaulted fields optional in responses that echo a stored config', () => {
    expectTypeOf<{
      name: 'n';
      description: 'd';
      builtin: false;
      config: { lora_config: { r: 8 }; training_config: { max_steps: 3 } };
      created_at: '2026-01-01T00:00:00Z';
    }>().toExtend<components['schemas']['Template']>();
    expectTypeOf<components['schemas']['LoraConfig']['lora_alpha']>().toEqualTypeOf<number | undefined>();
  });
});

describe('error types', () => {
  it("type e.code as the spec's union of codes and lastJob as a job", () => {
    expectTypeOf<APIError['code']>().toEqualTypeOf<ErrorCode | undefined>();
    expectTypeOf<'insufficient_credits'>().toExtend<ErrorCode>();
    expectTypeOf<'no_such_code'>().not.toExtend<ErrorCode>();
    expectTypeOf<JobWaitTimeoutError['lastJob']>().toEqualTypeOf<TrainingJob | DistillationJob>();
  });
});

describe('what the server reports, typed', () => {
  it('declares progress, results, config and metrics field by field', () => {
    expectTypeOf<DistillationJob['progress']['prompts_done']>().toEqualTypeOf<number | undefined>();
    expectTypeOf<NonNullable<DistillationJob['config']>['teacher_model']>().toEqualTypeOf<
      string | undefined
    >();
    expectTypeOf<NonNullable<TrainingJob['config']>['base_model']>().toEqualTypeOf<
      components['schemas']['ResolvedModel'] | undefined
    >();
    expectTypeOf<NonNullable<TrainingJob['metrics']>['train_loss']>().toEqualTypeOf<
      number | null | undefined
    >();
    expectTypeOf<DistillationJob['progress']>().not.toHaveProperty('anything_else');
  });
});

describe('training job create params', () => {
  type Create = Parameters<Tunery['training']['jobs']['create']>[0];
  it('take one variant per type with its required fields', () => {
    expectTypeOf<{ type: 'merge'; parent_job_id: 'job_1' }>().toExtend<Create>();
    expectTypeOf<{ type: 'benchmark'; source_model_id: 'm_1'; dataset_id: 'ds_1' }>().toExtend<Create>();
    expectTypeOf<{
      type: 'contract';
      base_model: 'x';
      hyperparams: { contraction_ratio: 0.5 };
    }>().toExtend<Create>();
    expectTypeOf<{
      type: 'train';
      base_model_id: 'bm_1';
      dataset_id: 'ds_1';
      hyperparams: { turns: 2 };
    }>().toExtend<Create>();
    expectTypeOf<{
      backend: 'native';
      base_model: 'gpt';
      dataset_id: 'ds_1';
      prompt_optimization: { teacher_model: 't' };
    }>().toExtend<Create>();
    // without data, the newest dataset; every type takes a seed, a template, a device pin
    expectTypeOf<{ base_model: 'x' }>().toExtend<Create>();
    expectTypeOf<{
      backend: 'native';
      base_model: 'gpt';
      prompt_optimization: { teacher_model: 't' };
    }>().toExtend<Create>();
    expectTypeOf<{
      type: 'train';
      base_model: 'x';
      training_config: { seed: 7 };
      backend: 'cuda';
    }>().toExtend<Create>();
    expectTypeOf<{ type: 'merge'; parent_job_id: 'j'; template: 't'; hf_token: 'hf' }>().toExtend<Create>();
  });

  it('refuse what cannot be a job, and a second spelling of a setting', () => {
    expectTypeOf<Record<string, never>>().not.toExtend<Create>();
    expectTypeOf<{ dataset_id: 'ds_1' }>().not.toExtend<Create>();
    expectTypeOf<{ type: 'merge' }>().not.toExtend<Create>();
    expectTypeOf<{ type: 'benchmark'; dataset_id: 'ds_1' }>().not.toExtend<Create>();
    // two data sources, two models
    expectTypeOf<{ base_model: 'x'; dataset_id: 'ds_1'; train_texts: ['a'] }>().not.toExtend<Create>();
    expectTypeOf<{ base_model: 'x'; source_model_id: 'm'; dataset_id: 'ds_1' }>().not.toExtend<Create>();
    // grow knobs are not fine-tune settings; a merge takes no data
    expectTypeOf<{ base_model: 'x'; dataset_id: 'ds_1'; hyperparams: { turns: 2 } }>().not.toExtend<Create>();
    expectTypeOf<{ type: 'merge'; parent_job_id: 'j'; dataset_id: 'ds_1' }>().not.toExtend<Create>();
    // another type's hyperparams, from a variable (no excess-property check to help), and a grow's
    // training settings beyond its seed
    const hp = { turns: 2, lora_rank: 8 };
    expectTypeOf<{ type: 'train'; base_model: 'x'; hyperparams: typeof hp }>().not.toExtend<Create>();
    expectTypeOf<{
      type: 'train';
      base_model: 'x';
      training_config: { max_steps: 3 };
    }>().not.toExtend<Create>();
  });

  it('flag a seed spelling in an object literal', () => {
    const create = (_: Create) => undefined;
    // @ts-expect-error: the rank is set in lora_config, not flat
    create({ base_model: 'x', dataset_id: 'ds_1', lora_rank: 8 });
    // @ts-expect-error: two data sources
    create({ base_model: 'x', dataset_id: 'ds_1', train_texts: ['a'] });
    // @ts-expect-error: an empty create
    create({});
    create({ base_model: 'x', dataset_id: 'ds_1', lora_config: { r: 8 } });
  });
});
