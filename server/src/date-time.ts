/**
 * The spec's `date-time` format, in both validators (bound-validator.ts, and express-openapi-validator
 * in app.ts): RFC 3339 as ajv-formats' fast mode takes it, and an instant both databases store and
 * read back as sent, that is in years 0100–9999 in UTC. RFC 3339 allows `0001-01-01T00:00:00+15:59`,
 * which Postgres stores as 1 BC and PGlite reads back as an invalid date (every later read of a job's
 * logs answered 500); PGlite also reads years 0–99 back as 1900–1999 or 2000–2099.
 */
import type { FormatDefinition } from 'ajv';
import { fastFormats } from 'ajv-formats/dist/formats.js';

/** The parts of an RFC 3339 timestamp that ajv-formats' fast mode accepts (`rfc3339` below). */
const RFC3339 =
  /^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:[Zz]|([+-])(\d{2})(?::?(\d{2}))?)$/;

/**
 * Milliseconds since the epoch (fields past their range roll over); not Date.UTC, which reads years
 * 0–99 as 1900–1999.
 */
function utcMillis(year: number, month = 1, day = 1, hours = 0, minutes = 0, seconds = 0): number {
  const date = new Date(0);
  date.setUTCFullYear(year, month - 1, day);
  date.setUTCHours(hours, minutes, seconds);
  return date.getTime();
}

/** 0100-01-01T00:00:00Z and 10000-01-01T00:00:00Z, in microseconds. */
const STORABLE = { from: utcMillis(100) * 1000, to: utcMillis(10_000) * 1000 };

/**
 * Whether an RFC 3339 timestamp's UTC instant, in microseconds as Postgres stores it (a leap second
 * rolls over into the next minute), falls in years 0100–9999.
 */
function inStorableYears(text: string): boolean {
  const m = RFC3339.exec(text);
  if (!m) return false;
  const [, year, month, day, hours, minutes, seconds, fraction, sign, offsetHours, offsetMinutes] = m;
  const millis = utcMillis(+year!, +month!, +day!, +hours!, +minutes!, +seconds!);
  const offset = sign ? (sign === '-' ? -1 : 1) * (+offsetHours! * 60 + Number(offsetMinutes ?? 0)) : 0;
  const micros = (millis - offset * 60_000) * 1000 + Math.round(Number(fraction ?? 0) * 1e6);
  return micros >= STORABLE.from && micros < STORABLE.to;
}

/** ajv-formats' fast `date-time`, which both validators used before. */
const rfc3339 = (fastFormats['date-time'] as { validate: RegExp }).validate;

/** The `date-time` format both validators add, in place of ajv-formats' own. */
export const STORABLE_DATE_TIME = {
  type: 'string',
  validate: (text: string) => rfc3339.test(text) && inStorableYears(text),
} satisfies FormatDefinition<string>;
