import { mkdir, rename } from 'node:fs/promises';
import { dirname, relative } from 'node:path';
import type { Readable } from 'node:stream';
import type { AppContext } from '../context.js';
import { newId } from '../ids.js';
import type { StoredObject } from '../storage.js';
import { type Db, fenceMissError } from './lease.js';

export type UploadKind = 'job_output' | 'checkpoint';

const folderOf = (kind: UploadKind) => (kind === 'checkpoint' ? 'checkpoints' : 'outputs');

/**
 * Fenced check before any byte is streamed: a stale attempt must not spend bandwidth or disk.
 * The upload is fenced again when it is recorded, since the lease can lapse mid-stream.
 */
export async function assertLeaseHeld(ctx: AppContext, jobId: string, leaseToken: string): Promise<void> {
  const row = await ctx
    .knex('jobs')
    .where({ id: jobId, lease_token: leaseToken, status: 'running' })
    .first('id');
  if (!row) throw await fenceMissError(ctx.knex, jobId);
}

export interface UploadRecord {
  kind: UploadKind;
  name: string;
  stored: StoredObject;
  /** Checkpoints: the step they were taken at. */
  step?: number;
}

/**
 * Records a streamed file as the job's, in one statement fenced by the lease: the `files` row
 * (replacing one of the same name), and for a checkpoint the job's `last_checkpoint_step` and a
 * `checkpoint` event. Returns false when the lease was lost meanwhile (nothing recorded).
 */
async function recordUpload(
  db: Db,
  jobId: string,
  leaseToken: string,
  upload: UploadRecord,
): Promise<boolean> {
  const isCheckpoint = upload.kind === 'checkpoint';
  const result = await db.raw(
    `
    WITH lease AS (
      UPDATE jobs SET
        last_checkpoint_step = CASE WHEN :isCheckpoint THEN :step ELSE last_checkpoint_step END,
        event_seq = event_seq + CASE WHEN :isCheckpoint THEN 1 ELSE 0 END,
        updated_at = now()
      -- fencing: a file from a stale attempt is not recorded
      WHERE id = :jobId AND lease_token = :leaseToken AND status = 'running'
      RETURNING id, tenant_id, event_seq, attempt
    ), file AS (
      INSERT INTO files (id, tenant_id, owner_kind, owner_id, name, rel_path, size_bytes, sha256, step)
      SELECT :fileId, lease.tenant_id, :kind, lease.id, :name, :relPath, :sizeBytes, :sha256, :step
      FROM lease
      -- uploading the same name again replaces the file
      ON CONFLICT (owner_kind, owner_id, name) DO UPDATE SET
        rel_path = EXCLUDED.rel_path, size_bytes = EXCLUDED.size_bytes, sha256 = EXCLUDED.sha256,
        step = EXCLUDED.step, created_at = now()
      RETURNING id
    ), event AS (
      INSERT INTO job_events (job_id, seq, ts, kind, payload)
      SELECT lease.id, lease.event_seq, now(), 'checkpoint',
        jsonb_build_object('name', :name::text, 'step', :step::int, 'attempt', lease.attempt)
      FROM lease WHERE :isCheckpoint
      RETURNING 1
    )
    SELECT (SELECT count(*) FROM lease)::int AS leased, (SELECT count(*) FROM file)::int AS files`,
    {
      jobId,
      leaseToken,
      isCheckpoint,
      step: upload.step ?? null,
      fileId: newId('file'),
      kind: upload.kind,
      name: upload.name,
      relPath: upload.stored.relPath,
      sizeBytes: upload.stored.sizeBytes,
      sha256: upload.stored.sha256,
    },
  );
  return (result.rows[0] as { leased: number }).leased > 0;
}

/**
 * Receives one worker upload: fenced before the first byte, streamed to a private temporary name,
 * then recorded and moved to `jobs/<id>/<outputs|checkpoints>/<name>` in one transaction that holds
 * the job's row lock. A stale attempt therefore never replaces a file the current attempt stored;
 * it gets `409 lease_lost` and leaves nothing behind.
 */
export async function receiveUpload(
  ctx: AppContext,
  jobId: string,
  leaseToken: string,
  upload: { kind: UploadKind; name: string; step?: number },
  body: Readable,
): Promise<StoredObject> {
  const target = ctx.storage.pathFor(['jobs', jobId, folderOf(upload.kind), upload.name]);
  await assertLeaseHeld(ctx, jobId, leaseToken);
  const incoming = await ctx.storage.put(['jobs', jobId, 'incoming', newId('file')], body);
  const stored = { ...incoming, relPath: relative(ctx.storage.root, target) };
  try {
    const recorded = await ctx.knex.transaction(async (trx) => {
      if (!(await recordUpload(trx, jobId, leaseToken, { ...upload, stored }))) return false;
      await mkdir(dirname(target), { recursive: true });
      await rename(ctx.storage.absolute(incoming.relPath), target);
      return true;
    });
    if (!recorded) throw await fenceMissError(ctx.knex, jobId);
    return stored;
  } finally {
    // gone already when it was moved into place
    await ctx.storage.remove(incoming.relPath);
  }
}
