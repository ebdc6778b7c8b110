// Following a job's metrics: read what is new, yield each item once, stop after the job ends.
import type { components } from '../generated/api.js';
import { sleep } from './abort.js';
import { DEFAULT_POLL_INTERVAL_MS, isTerminal } from './polling.js';

type Schemas = components['schemas'];

export interface FollowOptions {
  /** Milliseconds between polls while nothing new has arrived. Default 2000. */
  pollIntervalMs?: number | undefined;
  /** Stops following: the iterator rejects with APIUserAbortError. */
  signal?: AbortSignal | undefined;
}

type ReadMetrics = (sinceStep: number, signal: AbortSignal | undefined) => Promise<Schemas['MetricPage']>;
type ReadJob = (signal: AbortSignal | undefined) => Promise<{ status: Schemas['JobStatus'] }>;

/**
 * Every metric point after `sinceStep`, in step order, each (step, phase) once, until the job ends.
 * The newest step is read again on the next poll, so an eval point that lands after the train point
 * of the same step is not missed.
 */
export function followMetricPoints(
  readMetrics: ReadMetrics,
  readJob: ReadJob,
  { sinceStep = -1, ...options }: FollowOptions & { sinceStep?: number | undefined },
): AsyncGenerator<Schemas['MetricPoint'], void, undefined> {
  let cursor = sinceStep;
  let phasesAtCursor = new Set<string>();
  const isNew = (point: Schemas['MetricPoint']) =>
    point.step > cursor || (point.step === cursor && !phasesAtCursor.has(point.phase));
  const readNew = async () => {
    const page = await readMetrics(cursor > sinceStep ? cursor - 1 : cursor, options.signal);
    return page.points.filter(isNew);
  };
  const advance = (point: Schemas['MetricPoint']) => {
    if (point.step > cursor) {
      cursor = point.step;
      phasesAtCursor = new Set();
    }
    phasesAtCursor.add(point.phase);
  };
  return follow(readNew, advance, readJob, options);
}

/**
 * Reads new items until the job is terminal. The job's status is checked only after a read came back
 * empty, and once it is terminal one last read drains what was written before it ended.
 */
async function* follow<Item>(
  readNew: () => Promise<Item[]>,
  advance: (item: Item) => void,
  readJob: ReadJob,
  { pollIntervalMs = DEFAULT_POLL_INTERVAL_MS, signal }: FollowOptions,
): AsyncGenerator<Item, void, undefined> {
  let finished = false;
  for (;;) {
    const items = await readNew();
    for (const item of items) {
      advance(item);
      yield item;
    }
    if (items.length > 0) continue; // there may be more right away (reads are capped)
    if (finished) return;
    finished = isTerminal(await readJob(signal));
    if (!finished) await sleep(pollIntervalMs, signal);
  }
}
