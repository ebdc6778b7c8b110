/**
 * Runs `pass` every `intervalMs` (the first after one interval), one pass at a time: the next is
 * scheduled only when the previous settled, so a slow pass never overlaps itself. A failed pass is
 * logged and the loop goes on. `stop` waits for a pass in progress.
 */
export function repeatEvery(
  intervalMs: number,
  pass: () => Promise<void>,
  onError: (err: unknown) => void,
): { stop(): Promise<void> } {
  let timer: NodeJS.Timeout | undefined;
  let running: Promise<void> = Promise.resolve();
  let stopped = false;

  const schedule = () => {
    if (stopped) return;
    timer = setTimeout(() => {
      running = pass().catch(onError).finally(schedule);
    }, intervalMs);
    timer.unref();
  };
  schedule();

  return {
    stop: async () => {
      stopped = true;
      clearTimeout(timer);
      await running;
    },
  };
}
