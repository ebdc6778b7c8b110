import { describe, expect, it } from 'vitest';
import { newId, newSecret, randomBytesPooled } from '../src/ids.js';

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

  it('hands out bytes that later draws do not overwrite, and serves a draw larger than the pool', () => {
    const held = randomBytesPooled(16);
    const copy = Buffer.from(held);
    for (let i = 0; i < 1000; i++) randomBytesPooled(24);
    expect(held.equals(copy)).toBe(true);
    const large = randomBytesPooled(10_000);
    expect(large.length).toBe(10_000);
    expect(large.subarray(0, 16).equals(large.subarray(16, 32))).toBe(false);
  });
});
