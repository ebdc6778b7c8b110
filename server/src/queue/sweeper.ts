import type { AppContext } from '../context.js';

/** Starts the lease sweeper; returns a function that stops it. */
export function startSweeper(_ctx: AppContext): () => Promise<void> {
  return async () => {};
}
