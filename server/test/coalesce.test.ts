/**
 * The coalescer behind the claim's and the completion's group commit: which requests share a run,
 * when a run starts, and what each request gets back. Runs are settled by hand, so nothing here
 * depends on timing.
 */
import { describe, expect, it } from 'vitest';
import { Coalescer } from '../src/queue/coalesce.js';

interface Request {
  key: string;
  value: number;
}

/** A coalescer whose runs wait until the test settles them; `runs` records each run's inputs. */
function harness(maxBatch = 32) {
  const runs: { inputs: Request[]; settle(outputs?: number[]): void; fail(err: Error): void }[] = [];
  const coalescer = new Coalescer<Request, number>({
    run: (inputs) =>
      new Promise<number[]>((resolve, reject) => {
        runs.push({
          inputs,
          settle: (outputs = inputs.map((input) => input.value * 10)) => resolve(outputs),
          fail: reject,
        });
      }),
    key: (request) => request.key,
    maxBatch,
    gone: -1,
  });
  const submit = (key: string, value: number, signal?: AbortSignal) =>
    coalescer.submit({ key, value }, signal);
  const values = (run: number) => runs[run]!.inputs.map((input) => input.value);
  return { runs, submit, values };
}

/** Lets the promise callbacks of settled runs (and the runs they start) run. */
const settled = () => new Promise((resolve) => setImmediate(resolve));

describe('Coalescer', () => {
  it('runs a lone request at once, alone', async () => {
    const { runs, submit, values } = harness();
    const answer = submit('a', 1);
    expect(runs).toHaveLength(1);
    expect(values(0)).toEqual([1]);
    runs[0]!.settle();
    expect(await answer).toBe(10);
  });

  it('puts the requests that arrive while their key runs into the next run, in order, up to maxBatch', async () => {
    const { runs, submit, values } = harness(3);
    const answers = [1, 2, 3, 4, 5].map((value) => submit('a', value));
    expect(runs).toHaveLength(1); // the rest wait for the first run
    runs[0]!.settle();
    await settled();
    expect(runs).toHaveLength(2);
    expect(values(1)).toEqual([2, 3, 4]);
    runs[1]!.settle();
    await settled();
    expect(values(2)).toEqual([5]);
    runs[2]!.settle();
    expect(await Promise.all(answers)).toEqual([10, 20, 30, 40, 50]);
  });

  it('never mixes keys in a run, and runs different keys side by side', async () => {
    const { runs, submit, values } = harness();
    const answers = [submit('a', 1), submit('b', 2), submit('a', 3), submit('b', 4)];
    expect(runs.map((run) => run.inputs.map((input) => input.key))).toEqual([['a'], ['b']]);
    runs[1]!.settle();
    await settled();
    expect(values(2)).toEqual([4]);
    runs[0]!.settle();
    await settled();
    expect(values(3)).toEqual([3]);
    runs[2]!.settle();
    runs[3]!.settle();
    expect(await Promise.all(answers)).toEqual([10, 20, 30, 40]);
  });

  it('leaves out of its run a request whose caller went away while it waited, and answers it `gone`', async () => {
    const { runs, submit, values } = harness();
    const hungUp = new AbortController();
    const answers = [submit('a', 1), submit('a', 2, hungUp.signal), submit('a', 3)];
    hungUp.abort();
    runs[0]!.settle();
    await settled();
    expect(values(1)).toEqual([3]);
    runs[1]!.settle();
    expect(await Promise.all(answers)).toEqual([10, -1, 30]);
  });

  it("fails a failed run's requests only; the next run goes on", async () => {
    const { runs, submit } = harness();
    const first = submit('a', 1);
    const second = submit('a', 2);
    runs[0]!.fail(new Error('database down'));
    await expect(first).rejects.toThrow('database down');
    runs[1]!.settle();
    expect(await second).toBe(20);
  });

  it('fails a run that answers a different number of outputs than it was given', async () => {
    const { runs, submit } = harness();
    const first = submit('a', 1);
    runs[0]!.settle([]);
    await expect(first).rejects.toThrow('answered 0 outputs for 1 inputs');
  });

  it('fails the requests of a run that throws instead of returning a promise', async () => {
    const coalescer = new Coalescer<number, number>({
      run: () => {
        throw new Error('thrown');
      },
      key: () => 'a',
      maxBatch: 32,
    });
    await expect(coalescer.submit(1)).rejects.toThrow('thrown');
    // the key is free again
    await expect(coalescer.submit(2)).rejects.toThrow('thrown');
  });
});
