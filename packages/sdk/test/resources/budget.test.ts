import { describe, expect, it } from 'vitest';
import { InsufficientCreditsError } from '../../src/index.js';
import { useMockServer } from '../helpers.js';

const { client } = useMockServer();

describe('budget', () => {
  it('get and update; a job over the remaining budget is refused with 402', async () => {
    const tunery = client();
    expect(await tunery.budget.get()).toEqual({
      tenant_id: 'default',
      limit_usd: null,
      spent_usd: 0,
      remaining_usd: null,
    });
    expect(await tunery.budget.update({ limit_usd: 0.05 })).toMatchObject({
      limit_usd: 0.05,
      remaining_usd: 0.05,
    });
    const error = await tunery.training.jobs
      .create({ base_model: 'tiny-llama', train_texts: ['a'] })
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(InsufficientCreditsError);
    expect((error as InsufficientCreditsError).code).toBe('insufficient_credits');
    await tunery.budget.update({ limit_usd: null });
    await expect(
      tunery.training.jobs.create({ base_model: 'tiny-llama', train_texts: ['a'] }),
    ).resolves.toBeDefined();
  });
});
