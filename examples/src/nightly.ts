// A user's own code: every night, turn the day's agent trajectories into a dataset and fine-tune on
// it. Safe to run twice the same night (idempotency keys); skips quietly when there is nothing to
// learn from or no budget left.
import { type Dataset, InsufficientCreditsError, type TrainingJob, type Tunery } from '@tunery/sdk';

export interface NightlyOptions {
  /** The night, e.g. `2026-04-19`; it names the dataset and the run and keys their idempotency. */
  date: string;
  baseModel?: string;
  /** Fewer recorded trajectories than this: skip. */
  minTrajectories?: number;
}

export type NightlyResult =
  | { status: 'submitted'; job: TrainingJob; dataset: Dataset }
  | { status: 'skipped'; reason: 'not_enough_trajectories' | 'insufficient_credits' };

export async function submitNightlyFinetune(
  client: Tunery,
  { date, baseModel = 'tiny-llama', minTrajectories = 1 }: NightlyOptions,
): Promise<NightlyResult> {
  const { total } = await client.trajectories.list({ limit: 1 });
  if (total < minTrajectories) return { status: 'skipped', reason: 'not_enough_trajectories' };

  const dataset = await client.datasets.build(
    { name: `nightly-${date}` },
    { idempotencyKey: `nightly-dataset-${date}` },
  );
  try {
    const job = await client.training.jobs.create(
      {
        base_model: baseModel,
        dataset_id: dataset.id,
        method: 'lora',
        run_name: `nightly ${date}`,
        output_name: `nightly-${date}`,
      },
      { idempotencyKey: `nightly-job-${date}` },
    );
    return { status: 'submitted', job, dataset };
  } catch (err) {
    if (err instanceof InsufficientCreditsError) return { status: 'skipped', reason: 'insufficient_credits' };
    throw err;
  }
}
