/**
 * Wake-one long-polls: a signal for N runnable jobs wakes at most N waiting claims, first come first
 * woken, and a woken claim that finds nothing hands the wake on. The claims here recheck only once a
 * minute, so a claim that gets its job got it from a signal, never from the recheck.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type ClaimInput, type ClaimOutcome, claimJobWithWait } from '../src/queue/claim.js';
import { type EnqueueInput, enqueueJob } from '../src/queue/enqueue.js';
import { waitingClaims } from '../src/queue/notify.js';
import { sleep } from './fake-worker.js';
import { finetuneInput } from './fixtures.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

const worker = (workerId: string, jobTypes = ['finetune']): ClaimInput => ({
  workerId,
  capabilities: { job_types: jobTypes, device: 'cpu' },
});

describe.each(DATABASES)('wake-one claims on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(async () => {
    await server?.stop();
  });

  const job = finetuneInput;
  const enqueueInOne = (jobs: EnqueueInput[]) =>
    server.ctx.knex.transaction(async (trx) => {
      for (const input of jobs) await enqueueJob(server.ctx, trx, input);
    });

  /** A long-poll of up to 10 s that a signal alone can end early. */
  const waitingClaim = (input: ClaimInput) =>
    claimJobWithWait(server.ctx, input, 10, new AbortController().signal, 1, 60_000);

  /** Waits until `count` claims are in line (each has made its first, empty, claim). */
  const untilWaiting = async (count: number) => {
    while (waitingClaims(server.ctx) !== count) await sleep(5);
  };

  const attempts = async () => {
    const metric = await server.ctx.metrics.claimAttempts.get();
    const of = (outcome: string) => metric.values.find((v) => v.labels.outcome === outcome)?.value ?? 0;
    return { claimed: of('claimed'), empty: of('empty') };
  };

  const claimedId = (outcome: ClaimOutcome | null) => outcome?.jobs?.[0]?.id;

  it('wakes as many waiting claims as jobs were enqueued, first come first woken', async () => {
    const claims: Promise<ClaimOutcome | null>[] = [];
    for (let i = 0; i < 4; i++) {
      claims.push(waitingClaim(worker(`w${i}`)));
      await untilWaiting(i + 1);
    }
    const before = await attempts();
    const first = [job(), job()];
    await enqueueInOne(first);
    const woken = await Promise.all(claims.slice(0, 2));
    expect(woken.map(claimedId).sort()).toEqual(first.map((j) => j.id).sort());
    expect(waitingClaims(server.ctx)).toBe(2);
    // the two woken claims made one claim attempt each; the other two never woke
    expect(await attempts()).toEqual({ claimed: before.claimed + 2, empty: before.empty });

    const second = [job(), job()];
    await enqueueInOne(second);
    expect((await Promise.all(claims.slice(2))).map(claimedId).sort()).toEqual(
      second.map((j) => j.id).sort(),
    );
  });

  it('hands a wake on when the woken claim cannot run the job', async () => {
    const merger = waitingClaim(worker('merger', ['merge']));
    await untilWaiting(1);
    const finetuner = waitingClaim(worker('finetuner'));
    await untilWaiting(2);
    const before = await attempts();

    const finetune = job();
    await enqueueInOne([finetune]);
    // the merge-only worker was first in line: it woke, found nothing, and woke the next one
    expect(claimedId(await finetuner)).toBe(finetune.id);
    expect(waitingClaims(server.ctx)).toBe(1);
    expect(await attempts()).toEqual({ claimed: before.claimed + 1, empty: before.empty + 1 });

    const merge = job({ type: 'merge', method: null });
    await enqueueInOne([merge]);
    expect(claimedId(await merger)).toBe(merge.id);
  });

  it('counts claim attempts at /metrics', async () => {
    const res = await server.api('/metrics', { key: null });
    expect(res.status).toBe(200);
    const { claimed } = await attempts();
    expect(await res.text()).toContain(`tunery_claim_attempts_total{outcome="claimed"} ${claimed}`);
  });
});
