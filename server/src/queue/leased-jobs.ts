import type { Knex } from 'knex';
import { getOrCreate } from '../get-or-create.js';
import { OUTPUT_SOURCE_COLUMNS, type OutputSourceRow } from './types.js';

/**
 * The jobs this process leased, as their completion's plan reads them (OUTPUT_SOURCE_COLUMNS: set
 * when the job is created and never changed; its status and lease token are checked again by the
 * completing statement's fencing), per database. The usual completion, by the server that leased
 * the job, then needs no read before its statement (queue/complete.ts). An entry goes when its lease
 * ends through this process (completed, failed, released, cancel acknowledged); one whose lease
 * ended otherwise (expired, another server) stays until MAX newer ones push it out. A completion
 * that finds none for its lease reads the job instead.
 */
export class LeasedJobs {
  static readonly MAX = 10_000;
  private readonly byDatabase = new WeakMap<Knex, Map<string, OutputSourceRow>>();

  private of(knex: Knex): Map<string, OutputSourceRow> {
    return getOrCreate(this.byDatabase, knex, () => new Map());
  }

  /** Keeps what the completion of these just-leased jobs will read (claim.ts). */
  remember(knex: Knex, jobs: OutputSourceRow[]): void {
    const leased = this.of(knex);
    for (const job of jobs) {
      leased.delete(job.id); // a new lease goes to the back of the line
      if (leased.size >= LeasedJobs.MAX) leased.delete(leased.keys().next().value!);
      leased.set(job.id, pickOutputSource(job));
    }
  }

  /** The job as kept for this lease of it, if it is. */
  get(knex: Knex, jobId: string, leaseToken: string): OutputSourceRow | undefined {
    const job = this.of(knex).get(jobId);
    return job?.lease_token === leaseToken ? job : undefined;
  }

  /** Drops what was kept for the job: for its lease `leaseToken` only, or (none given) any. */
  forget(knex: Knex, jobId: string, leaseToken?: string): void {
    const leased = this.of(knex);
    if (leaseToken === undefined || leased.get(jobId)?.lease_token === leaseToken) leased.delete(jobId);
  }
}

export const leasedJobs = new LeasedJobs();

/** Only the columns the plan reads: a claim's row also holds the job's sealed secrets. */
const pickOutputSource = (job: OutputSourceRow): OutputSourceRow =>
  Object.fromEntries(OUTPUT_SOURCE_COLUMNS.map((column) => [column, job[column]])) as OutputSourceRow;
