/**
 * In a server child: runs `stop` on SIGTERM or SIGINT, and when stdin closes (the parent is gone,
 * however it ended), so no child outlives its run. Its own module: children.ts is the parent's side
 * and exits on those signals at once, before a child could drop its scratch database.
 */
export function stopWithParent(stop: () => unknown): void {
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  process.stdin.on('end', stop).on('close', stop).resume();
}
