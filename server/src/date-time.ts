/**
 * The spec's `date-time` format, in both validators (bound-validator.ts, and express-openapi-validator
 * in app.ts): an RFC 3339 timestamp that names a real instant (no February 30, no hour 24, no month
 * 13) which both databases store and read back as sent: one in years 0100–9999 in UTC, with a UTC
 * offset Postgres can hold (at most ±15:59). RFC 3339 allows `0001-01-01T00:00:00+15:59`, which
 * Postgres stores as 1 BC and PGlite's own driver (before the server reached PGlite through
 * node-postgres) read back as an invalid date (every later read of a job's logs answered 500); it
 * also read years 0–99 back as 1900–1999 or 2000–2099, and a year past 9999 came back as a date no
 * answer could show (an API key's `expires_at` answered 500). A timestamp
 * that is no date was refused by Postgres without naming its field, or, as an API key's expiry,
 * read by JavaScript as another day (`2099-02-30` as March 2).
 */
import type { FormatDefinition } from 'ajv';
// ajv-formats' own module (the package has no `exports` map; both validators load this one copy).
import { fastFormats } from 'ajv-formats/dist/formats.js';

/** ajv-formats' fast `date-time`, which both validators used before. */
const FAST_DATE_TIME = (fastFormats['date-time'] as { validate: RegExp }).validate;

/** The fields of a timestamp FAST_DATE_TIME accepts (it accepts no other: its first four are the year). */
const DATE_TIME_FIELDS =
  /^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:[Zz]|([+-])(\d{2})(?::?(\d{2}))?)$/;

/**
 * Milliseconds since the epoch (fields past their range roll over, as a leap second does in
 * Postgres); not Date.UTC, which reads years 0–99 as 1900–1999.
 */
function utcMillis(year: number, month = 1, day = 1, hours = 0, minutes = 0, seconds = 0): number {
  const date = new Date(0);
  date.setUTCFullYear(year, month - 1, day);
  date.setUTCHours(hours, minutes, seconds);
  return date.getTime();
}

/** 0100-01-01T00:00:00Z and 10000-01-01T00:00:00Z, in milliseconds: the storable instants' bounds. */
export const STORABLE_MS = { from: utcMillis(100), to: utcMillis(10_000) };

/** The largest UTC offset Postgres accepts, in minutes (±15:59). */
const MAX_OFFSET_MINUTES = 15 * 60 + 59;

/** The two-digit number at `at` (the regex has made sure both are digits). */
const twoDigits = (text: string, at: number) =>
  (text.charCodeAt(at) - 48) * 10 + text.charCodeAt(at + 1) - 48;

const DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
const isLeapYear = (year: number) => year % 4 === 0 && (year % 100 !== 0 || year % 400 === 0);
const daysInMonth = (year: number, month: number) =>
  month === 2 && isLeapYear(year) ? 29 : DAYS_IN_MONTH[month - 1]!;

/**
 * Whether a timestamp FAST_DATE_TIME took names a real date and time with an offset Postgres
 * takes: its regex lets through month 13, day 39, hour 29 and offset +99:99. Read by position (the
 * regex fixes where each field is: the offset, when there is one, ends the text), as it runs for
 * every timestamp of every request and answer. A leap second (`23:59:60`) is taken: Postgres rolls
 * it over into the next minute.
 */
function isRealDateTime(text: string): boolean {
  const year = Number(text.slice(0, 4));
  const month = twoDigits(text, 5);
  const day = twoDigits(text, 8);
  if (month < 1 || month > 12 || day < 1 || day > daysInMonth(year, month) || twoDigits(text, 11) > 23)
    return false;
  const last = text.charCodeAt(text.length - 1);
  if (last === 0x5a || last === 0x7a) return true; // Z or z: UTC
  const sign = Math.max(text.lastIndexOf('+'), text.lastIndexOf('-'));
  // +HH, +HHMM or +HH:MM
  const minutes = text.length - sign === 3 ? 0 : twoDigits(text, text.length - 2);
  return minutes <= 59 && twoDigits(text, sign + 1) * 60 + minutes <= MAX_OFFSET_MINUTES;
}

/** Microseconds of a fraction of a second, rounded as Postgres does (rint: half to even). */
function fractionMicros(digits: string | undefined): number {
  if (!digits) return 0;
  const exact = Number(`0.${digits}`) * 1e6;
  const rounded = Math.round(exact);
  return rounded - exact === 0.5 && rounded % 2 !== 0 ? rounded - 1 : rounded;
}

/**
 * The UTC instant of a timestamp the format took, in milliseconds since the epoch, as Postgres reads
 * it: a leap second rolls over into the next minute, a fraction is rounded to the microsecond and then
 * cut to the millisecond. Whole milliseconds are what a double holds exactly (microseconds since the
 * epoch are not: at year 9999 they are 32 apart). Not `new Date(text)`, which reads an offset of hours
 * alone (`+05`) and a leap second as no date. NaN for text the format refuses.
 */
export function dateTimeMillis(text: string): number {
  const fields = DATE_TIME_FIELDS.exec(text);
  if (!fields) return Number.NaN;
  const [, year, month, day, hours, minutes, seconds, fraction, sign, offsetHours, offsetMinutes] = fields;
  const offset = sign ? (sign === '-' ? -1 : 1) * (+offsetHours! * 60 + Number(offsetMinutes ?? 0)) : 0;
  return (
    utcMillis(+year!, +month!, +day!, +hours!, +minutes!, +seconds!) -
    offset * 60_000 +
    Math.floor(fractionMicros(fraction) / 1000)
  );
}

/** Whether the instant of a timestamp FAST_DATE_TIME took, to the microsecond, falls in years 0100–9999. */
function inStorableYears(text: string): boolean {
  // no offset or rollover moves an instant in these years out of the range
  const year = Number(text.slice(0, 4));
  if (year > 100 && year < 9999) return true;
  const millis = dateTimeMillis(text);
  return millis >= STORABLE_MS.from && millis < STORABLE_MS.to;
}

/** The `date-time` format both validators add, in place of ajv-formats' own. */
export const STORABLE_DATE_TIME = {
  type: 'string',
  validate: (text: string) => FAST_DATE_TIME.test(text) && isRealDateTime(text) && inStorableYears(text),
} satisfies FormatDefinition<string>;
