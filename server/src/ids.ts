import { randomBytes } from 'node:crypto';

/** Opaque prefixed ids (`job_4f0c…`): the prefix says what the object is, 24 hex chars make it unique. */
export type IdPrefix = 'job' | 'ds' | 'traj' | 'model' | 'bm' | 'file' | 'key' | 'wh' | 'whd' | 'inf';

export function newId(prefix: IdPrefix): string {
  return `${prefix}_${randomBytes(12).toString('hex')}`;
}

export function newSecret(prefix: 'tk' | 'tw' | 'lease' | 'whsec' | 'infreq'): string {
  return `${prefix}_${randomBytes(24).toString('base64url')}`;
}
