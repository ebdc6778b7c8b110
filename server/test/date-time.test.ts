import { describe, expect, it } from 'vitest';
import { dateTimeMillis, STORABLE_DATE_TIME } from '../src/date-time.js';

const valid = (text: string) => STORABLE_DATE_TIME.validate(text);

describe('the date-time format both validators use', () => {
  it('takes RFC 3339 timestamps whose UTC instant falls in years 0100–9999, to the microsecond', () => {
    const taken = [
      '2026-04-19T12:00:00Z',
      '2026-04-19t12:00:00.5z',
      '2026-04-19T12:00:00+0530',
      '2026-04-19T12:00:00-07',
      '0100-01-01T00:00:00Z',
      '0100-01-01T15:59:00+15:59',
      '0099-12-31T23:59:60Z', // a leap second rolls over into 0100
      '0099-12-31T23:59:59.9999995Z', // rounds up to 0100-01-01, as Postgres rounds it
      '9999-12-31T23:59:59.999999Z',
      '9999-12-31T23:59:59.9999994Z',
      '9999-12-31T23:59:59-00:00',
    ];
    expect(taken.filter((text) => !valid(text))).toEqual([]);
  });

  it('refuses instants outside those years, whatever the offset, and what is not RFC 3339', () => {
    const refused = [
      '0001-01-01T00:00:00+15:59',
      '0099-12-31T23:59:59.999999Z',
      '0100-01-01T00:00:00.999999+00:01',
      '10000-01-01T00:00:00Z',
      '9999-12-31T23:59:60Z',
      '9999-12-31T23:59:59.9999995Z',
      '9999-12-31T23:59:59-00:01',
      '9999-12-31T23:59:59.999999-00:01',
      '2026-04-19 12:00:00Z',
      '2026-04-19T12:00:00',
      '2026-04-19',
    ];
    expect(refused.filter(valid)).toEqual([]);
  });

  // The format's regex lets each of the refused through. Postgres refused them as sent (without the
  // field's name), or read `24:00:00` as the next day; JavaScript read 2099-02-30 as March 2.
  it('takes only real dates and times, with an offset Postgres can store', () => {
    const taken = [
      '2096-02-29T00:00:00Z',
      '2000-02-29T00:00:00Z',
      '2026-01-31T23:59:59Z',
      '2026-12-31T23:59:60Z',
      '2026-04-19T12:00:00+15:59',
      '2026-04-19T12:00:00-1559',
      '2026-04-19T12:00:00+15',
    ];
    const refused = [
      '2099-02-29T00:00:00Z',
      '1900-02-29T00:00:00Z',
      '2099-02-30T00:00:00Z',
      '2026-04-31T00:00:00Z',
      '2026-04-00T00:00:00Z',
      '2026-00-10T00:00:00Z',
      '2026-13-01T00:00:00Z',
      '2026-04-19T24:00:00Z',
      '2026-04-19T29:00:00z',
      '2026-04-19T12:00:00+16:00',
      '2026-04-19T12:00:00-1600',
      '2026-04-19T12:00:00+16',
      '2026-04-19T12:00:00+05:60',
      '0100-02-30T00:00:00Z',
      '9999-02-30T00:00:00Z',
    ];
    expect(taken.filter((text) => !valid(text))).toEqual([]);
    expect(refused.filter(valid)).toEqual([]);
  });

  it('reads the instant as Postgres does: an offset of hours alone, a leap second rolled over', () => {
    expect(dateTimeMillis('2026-04-19T12:00:00+05')).toBe(Date.UTC(2026, 3, 19, 7));
    expect(dateTimeMillis('2026-04-19T12:00:00.5-0530')).toBe(Date.UTC(2026, 3, 19, 17, 30, 0, 500));
    expect(dateTimeMillis('2026-12-31T23:59:60Z')).toBe(Date.UTC(2027, 0, 1));
    expect(dateTimeMillis('0100-01-01T00:00:00Z')).toBe(-59011459200000);
    expect(dateTimeMillis('2026-04-19')).toBeNaN();
  });
});
