import type { Knex } from 'knex';
import { describe, expect, it } from 'vitest';
import { LeasedJobs, leasedJobs } from '../src/queue/leased-jobs.js';
import type { OutputSourceRow } from '../src/queue/types.js';

const job = (id: string, leaseToken: string) =>
  ({
    id,
    tenant_id: 't',
    type: 'finetune',
    method: 'lora',
    status: 'running',
    lease_token: leaseToken,
    config: {},
    base_model: null,
    description: null,
    dataset_id: null,
    model_id: null,
    secrets: { sealed: 'never kept' },
  }) as OutputSourceRow;

describe('the leases a server keeps for their completion', () => {
  it('answers only for the lease kept, and keeps no more than the plan reads', () => {
    const knex = {} as Knex;
    leasedJobs.remember(knex, [job('job_a', 'lease_1')]);
    expect(leasedJobs.get(knex, 'job_a', 'lease_2')).toBeUndefined();
    expect(leasedJobs.get(knex, 'job_a', 'lease_1')).toMatchObject({ id: 'job_a', lease_token: 'lease_1' });
    expect(leasedJobs.get(knex, 'job_a', 'lease_1')).not.toHaveProperty('secrets');
    expect(leasedJobs.get({} as Knex, 'job_a', 'lease_1')).toBeUndefined(); // another database's
  });

  it("forgets a lease when it ends, but not on another lease's word", () => {
    const knex = {} as Knex;
    leasedJobs.remember(knex, [job('job_a', 'lease_1'), job('job_b', 'lease_1')]);
    leasedJobs.forget(knex, 'job_a', 'lease_old');
    expect(leasedJobs.get(knex, 'job_a', 'lease_1')).toBeDefined();
    leasedJobs.forget(knex, 'job_a', 'lease_1');
    expect(leasedJobs.get(knex, 'job_a', 'lease_1')).toBeUndefined();
    leasedJobs.forget(knex, 'job_b');
    expect(leasedJobs.get(knex, 'job_b', 'lease_1')).toBeUndefined();
  });

  it('holds at most MAX jobs: the least recently leased go first', () => {
    const knex = {} as Knex;
    leasedJobs.remember(
      knex,
      Array.from({ length: LeasedJobs.MAX }, (_, i) => job(`job_${i}`, 'lease_1')),
    );
    leasedJobs.remember(knex, [job('job_5', 'lease_2')]); // leased again: now the newest
    leasedJobs.remember(
      knex,
      Array.from({ length: 6 }, (_, i) => job(`job_new_${i}`, 'lease_1')),
    );
    for (const gone of [0, 1, 2, 3, 4, 6])
      expect(leasedJobs.get(knex, `job_${gone}`, 'lease_1')).toBeUndefined();
    expect(leasedJobs.get(knex, 'job_5', 'lease_2')).toBeDefined();
    expect(leasedJobs.get(knex, 'job_7', 'lease_1')).toBeDefined();
    expect(leasedJobs.get(knex, 'job_new_5', 'lease_1')).toBeDefined();
  });
});
