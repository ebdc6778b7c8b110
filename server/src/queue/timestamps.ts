import { badRequest } from '../errors.js';

/** RFC 3339 as the spec's validator takes it: `T`, `t` or a space; `Z`, `z` or an offset (minutes optional). */
const RFC3339 =
  /^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:[Zz]|([+-])(\d{2})(?::?(\d{2}))?)$/;

/** The UTC instant of an RFC 3339 timestamp, in microseconds, as Postgres stores it (leap second rolls over). */
function utcMicros(ts: string): number | undefined {
  const m = RFC3339.exec(ts);
  if (!m) return undefined;
  const [, year, month, day, hour, minute, second, fraction, sign, offsetHours, offsetMinutes] = m;
  const date = new Date(0);
  date.setUTCFullYear(Number(year), Number(month) - 1, Number(day));
  date.setUTCHours(Number(hour), Number(minute), Number(second));
  const offset = sign ? (sign === '-' ? -1 : 1) * (Number(offsetHours) * 60 + Number(offsetMinutes ?? 0)) : 0;
  const micros = Math.round(Number(fraction ?? 0) * 1e6);
  return (date.getTime() - offset * 60_000) * 1000 + micros;
}

/** 0100-01-01T00:00:00Z and 10000-01-01T00:00:00Z, in microseconds. */
const RANGE = (() => {
  const at = (year: number) => {
    const date = new Date(0);
    date.setUTCFullYear(year, 0, 1);
    return date.getTime() * 1000;
  };
  return { from: at(100), to: at(10_000) };
})();

/**
 * Refuses (400) a worker's timestamp whose UTC instant falls outside years 0100–9999, which both
 * databases read back as they stored it. RFC 3339 allows `0001-01-01T00:00:00+15:59`, which
 * Postgres stores as 1 BC and no answer can show as a UTC timestamp (PGlite reads it back as an
 * invalid date, and every later read of the job's logs failed); PGlite also reads years 0–99 back
 * as 1900–1999 or 2000–2099.
 */
export function checkStorableTimestamp(ts: string | null | undefined, param: string): void {
  if (ts == null) return;
  const micros = utcMicros(ts);
  if (micros === undefined) return; // not RFC 3339: the validator refused it before this
  if (micros < RANGE.from || micros >= RANGE.to)
    throw badRequest(`${param}: ${ts} is outside years 0100–9999 in UTC.`, param);
}
