import type { Knex } from 'knex';
import { getOrCreate } from '../get-or-create.js';

/**
 * When this process last recorded each worker as seen (a `last_seen_at` row), per database: a busy
 * worker claims and reports many times a second, and "online" only means seen within the last
 * minute, so a record within REFRESH_MS of the last one, saying the same (`what`: its capabilities,
 * its serving backend; `null`: nothing new), is skipped. Unknown workers and changes are written at once.
 */
export class SeenWorkers {
  static readonly REFRESH_MS = 5_000;
  static readonly MAX = 10_000;
  private readonly byDatabase = new WeakMap<Knex, Map<string, { what: string | null; at: number }>>();

  private of(knex: Knex) {
    return getOrCreate(this.byDatabase, knex, () => new Map());
  }

  /** Whether worker `id`, saying `what`, needs writing now. */
  due(knex: Knex, id: string, what: string | null): boolean {
    const last = this.of(knex).get(id);
    if (!last || Date.now() - last.at >= SeenWorkers.REFRESH_MS) return true;
    return what !== null && what !== last.what;
  }

  /** Notes that worker `id` was just written, saying `what`. */
  recorded(knex: Knex, id: string, what: string | null): void {
    const seen = this.of(knex);
    const known = what ?? seen.get(id)?.what ?? null;
    if (seen.size >= SeenWorkers.MAX) seen.clear();
    seen.set(id, { what: known, at: Date.now() });
  }
}
