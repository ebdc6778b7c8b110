import type { Knex } from 'knex';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { SeenWorkers } from '../src/queue/seen-workers.js';

describe('SeenWorkers: a worker seen again soon, saying the same, is not written again', () => {
  const knex = {} as Knex;
  const other = {} as Knex;
  let now = 1_000_000;
  vi.spyOn(Date, 'now').mockImplementation(() => now);
  afterEach(() => {
    now = 1_000_000;
  });

  it('writes a new worker, then a change at once, and the same only after REFRESH_MS', () => {
    const seen = new SeenWorkers();
    expect(seen.due(knex, 'w', 'cpu')).toBe(true);
    seen.recorded(knex, 'w', 'cpu');
    expect(seen.due(knex, 'w', 'cpu')).toBe(false);
    expect(seen.due(knex, 'w', null)).toBe(false);
    expect(seen.due(knex, 'w', 'cuda')).toBe(true);
    // another database has not seen it
    expect(seen.due(other, 'w', 'cpu')).toBe(true);
    now += SeenWorkers.REFRESH_MS - 1;
    expect(seen.due(knex, 'w', 'cpu')).toBe(false);
    now += 1;
    expect(seen.due(knex, 'w', 'cpu')).toBe(true);
    expect(seen.due(knex, 'w', null)).toBe(true);
  });

  it('keeps what a worker said when a write says nothing new', () => {
    const seen = new SeenWorkers();
    seen.recorded(knex, 'w', 'vllm');
    now += SeenWorkers.REFRESH_MS;
    seen.recorded(knex, 'w', null);
    expect(seen.due(knex, 'w', 'vllm')).toBe(false);
    expect(seen.due(knex, 'w', 'transformers')).toBe(true);
  });
});
