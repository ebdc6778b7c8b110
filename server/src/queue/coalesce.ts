/**
 * Group commit for the queue's hot statements. Under load many workers claim, or complete, at the
 * same moment, and each statement costs Postgres the same commit, plan start-up and round trip
 * whatever it carries. A coalescer has one run per key in flight at a time: requests of a key that
 * arrive while its run is in flight wait for it to end, and the next run takes them together (up to
 * `maxBatch`, in order of arrival). A request whose key has no run in flight never waits: it runs at
 * once, alone. Runs of different keys (claims of other job types, say) go side by side.
 */

/**
 * Whether the caller of a request went away (hung up before its answer): read, never listened to.
 * An AbortSignal is one; so is a plain flag (routes/workers.ts), which costs far less to make.
 */
export interface CallerGone {
  readonly aborted: boolean;
}

export interface CoalescerOptions<In, Out> {
  /** One output per input, in order. A failure fails every request of the run. */
  run: (inputs: In[]) => Promise<Out[]>;
  /** Requests of one key can share a run (a claim's capabilities, say). */
  key: (input: In) => string;
  maxBatch: number;
  /**
   * The output of a request whose signal aborted while it waited: it is left out of its run. Without
   * it, signals are not heeded.
   */
  gone?: Out;
}

interface Waiting<In, Out> {
  input: In;
  key: string;
  signal?: CallerGone;
  resolve: (output: Out) => void;
  reject: (reason: unknown) => void;
}

export class Coalescer<In, Out> {
  /** Keys with a run in flight. */
  private readonly running = new Set<string>();
  private readonly waiting: Waiting<In, Out>[] = [];

  constructor(private readonly options: CoalescerOptions<In, Out>) {
    if (!(options.maxBatch >= 1))
      throw new RangeError(`maxBatch must be at least 1, not ${options.maxBatch}`);
  }

  /** `signal`: the caller went away; once aborted, a request still waiting gets `gone`, not a run. */
  submit(input: In, signal?: CallerGone): Promise<Out> {
    return new Promise<Out>((resolve, reject) => {
      this.waiting.push({ input, key: this.options.key(input), signal, resolve, reject });
      this.startRuns();
    });
  }

  /** Starts a run for every key that has requests waiting and none in flight. */
  private startRuns(): void {
    for (;;) {
      const next = this.waiting.find((request) => !this.running.has(request.key));
      if (!next) return;
      this.start(next.key);
    }
  }

  private start(key: string): void {
    const batch = this.takeBatch(key);
    if (batch.length === 0) return; // every one of them went away
    this.running.add(key);
    this.runBatch(batch.map((request) => request.input))
      .then((outputs) => {
        if (outputs.length !== batch.length)
          throw new Error(`a coalesced run answered ${outputs.length} outputs for ${batch.length} inputs`);
        for (const [i, request] of batch.entries()) request.resolve(outputs[i]!);
      })
      .catch((err: unknown) => {
        for (const request of batch) request.reject(err);
      })
      .finally(() => {
        this.running.delete(key);
        this.startRuns();
      });
  }

  /** `run`, with a synchronous throw as a rejection. */
  private async runBatch(inputs: In[]): Promise<Out[]> {
    return this.options.run(inputs);
  }

  /**
   * The waiting requests of `key`, up to maxBatch, in order of arrival, out of the line; those whose
   * caller went away leave it too, answered `gone`.
   */
  private takeBatch(key: string): Waiting<In, Out>[] {
    const batch: Waiting<In, Out>[] = [];
    for (let i = 0; i < this.waiting.length && batch.length < this.options.maxBatch; ) {
      const request = this.waiting[i]!;
      if (request.key !== key) {
        i++;
        continue;
      }
      this.waiting.splice(i, 1);
      const { gone } = this.options;
      if (request.signal?.aborted && gone !== undefined) request.resolve(gone);
      else batch.push(request);
    }
    return batch;
  }
}
