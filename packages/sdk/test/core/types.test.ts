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
