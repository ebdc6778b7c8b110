import { describe, expect, it } from 'vitest';
import { newId, newSecret, randomText } from '../src/ids.js';

describe('ids and secrets from the pooled CSPRNG', () => {
  it('have their prefix and length', () => {
    expect(newId('job')).toMatch(/^job_[0-9a-f]{24}$/);
    expect(newSecret('lease')).toMatch(/^lease_[A-Za-z0-9_-]{32}$/);
  });

  it('never repeat, across many refills of the pool', () => {
    // 24 bytes each: 5,000 secrets take the pool about thirty times
    const secrets = Array.from({ length: 5000 }, () => newSecret('tw'));
    expect(new Set(secrets).size).toBe(secrets.length);
    const ids = Array.from({ length: 5000 }, () => newId('model'));
    expect(new Set(ids).size).toBe(ids.length);
  });

  it('hand out no byte twice: consecutive draws share no 4-byte run', () => {
    // a pool that moved on by half a draw would start each draw with the last one's tail
    const draws = Array.from({ length: 2000 }, () => randomText(8, 'hex'));
    for (let i = 1; i < draws.length; i++) expect(draws[i]!.slice(0, 8)).not.toBe(draws[i - 1]!.slice(8));
  });

  it('refuse sizes that are not a whole number of bytes within the pool', () => {
    for (const size of [0, -1, 1.5, 4097]) expect(() => randomText(size, 'hex')).toThrow(RangeError);
  });
});
