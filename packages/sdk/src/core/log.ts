// Levelled logging through a console-like logger the caller may replace.

export type LogLevel = 'off' | 'error' | 'warn' | 'info' | 'debug';

type LogFn = (message: string, ...rest: unknown[]) => void;

/** Anything with console's four methods (console itself, pino, winston…). */
export interface Logger {
  error: LogFn;
  warn: LogFn;
  info: LogFn;
  debug: LogFn;
}

const LEVEL_RANK: Record<LogLevel, number> = { off: 0, error: 1, warn: 2, info: 3, debug: 4 };

export function isLogLevel(value: unknown): value is LogLevel {
  return typeof value === 'string' && value in LEVEL_RANK;
}

const noop: LogFn = () => {};

/** A logger that drops messages below `level` and prefixes the rest with `[tunery]`. */
export function levelledLogger(logger: Logger, level: LogLevel): Logger {
  const at = (l: Exclude<LogLevel, 'off'>): LogFn =>
    LEVEL_RANK[level] >= LEVEL_RANK[l]
      ? (message, ...rest) => logger[l](`[tunery] ${message}`, ...rest)
      : noop;
  return { error: at('error'), warn: at('warn'), info: at('info'), debug: at('debug') };
}
