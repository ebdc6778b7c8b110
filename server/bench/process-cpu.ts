/**
 * CPU time of other processes, read from Linux's /proc: a server under test and the Postgres
 * server's processes. On a machine shared by the server, Postgres and the load generator, this
 * says where each job's time went, which a rate alone does not. Elsewhere (no /proc) every reading
 * is undefined and the benchmarks leave these figures out.
 */
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';

/** Clock ticks per second, the unit of /proc's CPU times (100 on every usual Linux). */
const TICKS_PER_SECOND = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/** User + system CPU of one process so far, in µs; undefined when it cannot be read. */
export function processCpuMicros(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return ((Number(fields[11]) + Number(fields[12])) * 1e6) / TICKS_PER_SECOND;
  } catch {
    return undefined;
  }
}

/**
 * CPU so far of every process named `postgres` (the server, its backends, its WAL writer…), in µs;
 * undefined without /proc. Backends that exit between two readings take their time with them, so
 * read it around work whose connections stay open.
 */
export function postgresCpuMicros(): number | undefined {
  let pids: string[];
  try {
    pids = readdirSync('/proc').filter((name) => /^\d+$/.test(name));
  } catch {
    return undefined;
  }
  let total = 0;
  for (const pid of pids) {
    try {
      if (readFileSync(`/proc/${pid}/comm`, 'utf8').trim() !== 'postgres') continue;
    } catch {
      continue; // gone since the listing
    }
    total += processCpuMicros(Number(pid)) ?? 0;
  }
  return total;
}

/** The machine's CPU time so far, all cores, in clock ticks: idle (waiting for I/O included) and in all. */
function machineTicks(): { idle: number; total: number } | undefined {
  try {
    // the first line of /proc/stat: `cpu  user nice system idle iowait irq softirq steal …`
    const ticks = readFileSync('/proc/stat', 'utf8')
      .split('\n', 1)[0]!
      .trim()
      .split(/\s+/)
      .slice(1)
      .map(Number);
    return { idle: ticks[3]! + ticks[4]!, total: ticks.reduce((sum, t) => sum + t, 0) };
  } catch {
    return undefined;
  }
}

/**
 * The share of the machine's CPU left idle between now and `after()`, undefined without /proc. A
 * drain that leaves much of it idle is bound by waiting (on a statement, a lock, an event loop), not
 * by CPU: taking CPU off it then gains little.
 */
export function idleShareSince(): () => number | undefined {
  const before = machineTicks();
  return () => {
    const after = machineTicks();
    if (!before || !after || after.total === before.total) return undefined;
    return (after.idle - before.idle) / (after.total - before.total);
  };
}

/** CPU a reading function counted between now and `after()`, per `count` (µs each); undefined when unread. */
export function cpuPer(read: () => number | undefined): (count: number) => number | undefined {
  const before = read();
  return (count) => {
    const after = read();
    return before === undefined || after === undefined ? undefined : (after - before) / Math.max(1, count);
  };
}
