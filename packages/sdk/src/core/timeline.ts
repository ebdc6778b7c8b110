// A job's logs, metrics and events as ItemsPromises: `await` for one read, `for await` for all of it.
// Shared by training and distillation jobs, whose reads take the same cursors.
import type { components } from '../generated/api.js';
import type { APIPromise } from './api-promise.js';
import { ItemsPromise } from './pagination.js';

type Schemas = components['schemas'];

/** Log lines after `since`; with `tail`, only that read (the last lines are all it asks for). */
export function logLines<Q extends { since?: number; tail?: number }>(
  read: (query: Q) => APIPromise<Schemas['LogPage']>,
  query: Q,
): ItemsPromise<Schemas['LogPage'], Schemas['LogLine']> {
  return new ItemsPromise(
    read(query),
    (page) => page.lines,
    (page, last) =>
      query.tail === undefined && last.seq < page.latest_seq
        ? read({ ...query, since: last.seq })
        : undefined,
  );
}

/**
 * Metric points after `since_step`. A read may end between the train and eval points of one step,
 * so the next read starts at that step again and keeps only the phases not yet seen there.
 */
export function metricPoints<Q extends { since_step?: number }>(
  read: (query: Q) => APIPromise<Schemas['MetricPage']>,
  query: Q,
): ItemsPromise<Schemas['MetricPage'], Schemas['MetricPoint']> {
  const readAfter = (page: Schemas['MetricPage'], last: Schemas['MetricPoint']) => {
    const seen = new Set(page.points.filter((p) => p.step === last.step).map((p) => p.phase));
    const isNew = (p: Schemas['MetricPoint']) =>
      p.step > last.step || (p.step === last.step && !seen.has(p.phase));
    return read({ ...query, since_step: last.step - 1 }).then((next) => {
      const points = next.points.filter(isNew);
      return { ...next, count: points.length, points };
    });
  };
  return new ItemsPromise(read(query), (page) => page.points, readAfter);
}

/** Timeline events after `since` (a seq), read until a read brings none. */
export function timelineEvents<Q extends { since?: number }>(
  read: (query: Q) => APIPromise<Schemas['EventList']>,
  query: Q,
): ItemsPromise<Schemas['EventList'], Schemas['JobEvent']> {
  return new ItemsPromise(
    read(query),
    (list) => list.events,
    (_list, last) => read({ ...query, since: last.seq }),
  );
}
