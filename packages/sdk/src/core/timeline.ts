// A job's logs, metrics and events as ItemsPromises: `await` for one read, `for await` for all of it.
// Shared by training and distillation jobs, whose reads take the same cursors.
import type { components } from '../generated/api.js';
import type { APIPromise } from './api-promise.js';
import { ItemsPromise } from './pagination.js';

type Schemas = components['schemas'];

/** The items of one answer, for reads that need no follow-up (checkpoints, outputs). */
export function allOf<Body, Item>(
  read: APIPromise<Body>,
  items: (body: Body) => Item[],
): ItemsPromise<Body, Item> {
  return new ItemsPromise(read, async function* (body) {
    yield* items(body);
  });
}

/** Log lines after `since`, read on until the last stored; with `tail`, only that read. */
export function logLines<Q extends { since?: number; tail?: number }>(
  read: (query: Q) => APIPromise<Schemas['LogPage']>,
  query: Q,
): ItemsPromise<Schemas['LogPage'], Schemas['LogLine']> {
  return new ItemsPromise(read(query), async function* (first) {
    for (let page = first; ; ) {
      yield* page.lines;
      const last = page.lines.at(-1);
      if (query.tail !== undefined || !last || last.seq >= page.latest_seq) return;
      page = await read({ ...query, since: last.seq });
    }
  });
}

/**
 * Metric points after `since_step`, each (step, phase) once. A read may end between the train and
 * eval points of one step, so the next read starts at that step again and keeps only what is new;
 * the walk ends with the first read that brings nothing new. (A `limit` of 1 cannot hold both
 * points of a step: past such a step the walk moves on to the next.)
 */
export function metricPoints<Q extends { since_step?: number }>(
  read: (query: Q) => APIPromise<Schemas['MetricPage']>,
  query: Q,
): ItemsPromise<Schemas['MetricPage'], Schemas['MetricPoint']> {
  return new ItemsPromise(read(query), async function* (first) {
    let step = Number.NEGATIVE_INFINITY; // the last step yielded, and its phases
    let phases = new Set<string>();
    const isNew = (p: Schemas['MetricPoint']) => p.step > step || (p.step === step && !phases.has(p.phase));
    for (let page = first; ; ) {
      const fresh = page.points.filter(isNew);
      for (const point of fresh) {
        if (point.step > step) [step, phases] = [point.step, new Set()];
        phases.add(point.phase);
        yield point;
      }
      if (page.points.length === 0) return;
      // Nothing new although the read was not empty: it held only the points of `step`; go past it.
      const stuck = fresh.length === 0;
      if (stuck && page.points.every((p) => p.step <= step) && step >= page.latest_step) return;
      page = await read({ ...query, since_step: stuck ? step : step - 1 });
      if (stuck && page.points.length === 0) return;
    }
  });
}

/** Timeline events after `since` (a seq), read until a read brings none. */
export function timelineEvents<Q extends { since?: number }>(
  read: (query: Q) => APIPromise<Schemas['EventList']>,
  query: Q,
): ItemsPromise<Schemas['EventList'], Schemas['JobEvent']> {
  return new ItemsPromise(read(query), async function* (first) {
    for (let list = first; list.events.length > 0; ) {
      yield* list.events;
      list = await read({ ...query, since: list.events.at(-1)!.seq });
    }
  });
}
