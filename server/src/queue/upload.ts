import type { Readable } from 'node:stream';
import type { AppContext } from '../context.js';
import { ApiError, badRequest } from '../errors.js';
import { newId } from '../ids.js';
import type { PartWriter, StoredObject } from '../storage.js';
import { type Db, fenceMissError, runningSql } from './lease.js';

export type UploadKind = 'job_output' | 'checkpoint';

const folderOf = (kind: UploadKind) => (kind === 'checkpoint' ? 'checkpoints' : 'outputs');

/**
 * Fenced check before any byte is streamed: a stale attempt must not spend bandwidth or disk.
 * The upload is fenced again when it is recorded, since the lease can lapse mid-stream.
 */
export async function assertLeaseHeld(ctx: AppContext, jobId: string, leaseToken: string): Promise<void> {
  const row = await ctx
    .knex('jobs')
    .where({ id: jobId, lease_token: leaseToken })
    .whereRaw(runningSql())
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
      WHERE id = :jobId AND lease_token = :leaseToken AND ${runningSql()}
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

/** `Content-Range: bytes <first>-<last>/<total>` of a request body: this body is bytes first..last. */
export interface ContentRange {
  first: number;
  last: number;
  total: number;
}

/** Parses a request's Content-Range (undefined without one: the body is the whole file). */
export function parseContentRange(header: string | undefined, maxBytes: number): ContentRange | undefined {
  if (header === undefined) return undefined;
  const match = /^bytes (\d{1,15})-(\d{1,15})\/(\d{1,15})$/.exec(header.trim());
  const [first, last, total] = match ? match.slice(1).map(Number) : [];
  if (first === undefined || last === undefined || total === undefined || first > last || last >= total) {
    throw badRequest(
      'Content-Range must be "bytes <first>-<last>/<total>" with first <= last < total.',
      'Content-Range',
    );
  }
  if (total > maxBytes) throw new ApiError(413, 'payload_too_large', `Upload exceeds ${maxBytes} bytes.`);
  return { first, last, total };
}

export type UploadTarget = { kind: UploadKind; name: string; step?: number };

const segmentsOf = (jobId: string, upload: UploadTarget) => [
  'jobs',
  jobId,
  folderOf(upload.kind),
  upload.name,
];

/** The outcome of one upload request: the whole file stored, or a chunk of it received. */
export type UploadResult =
  | { complete: true; stored: StoredObject }
  | { complete: false; receivedBytes: number };

/**
 * Receives one worker upload request, fenced before the first byte. The bytes go to the file's part
 * (`storage.openPart`): a request without Content-Range sends the whole file; one with it sends
 * bytes first..last and must start where the part ends (`GET …/offset` says where), so a dropped
 * connection resumes instead of starting over. When the part holds the whole file it is fsync'ed,
 * recorded by a statement fenced by the lease, and only then moved to
 * `jobs/<id>/<outputs|checkpoints>/<name>`. A stale attempt therefore never replaces a file the
 * current attempt stored; it gets `409 lease_lost` and leaves nothing behind.
 */
export async function receiveUpload(
  ctx: AppContext,
  jobId: string,
  leaseToken: string,
  upload: UploadTarget,
  body: Readable,
  range: ContentRange | undefined,
): Promise<UploadResult> {
  const segments = segmentsOf(jobId, upload);
  ctx.storage.pathFor(segments);
  await assertLeaseHeld(ctx, jobId, leaseToken);
  const part = await ctx.storage.openPart(segments, range?.first ?? 0);
  // A newer request for this file (the worker retrying) takes over: stop reading this body.
  const stop = () => body.destroy(part.superseded.reason as Error);
  part.superseded.addEventListener('abort', stop, { once: true });
  try {
    await receiveBody(part, body, range);
  } catch (err) {
    part.superseded.removeEventListener('abort', stop);
    // What arrived stays for a resumed request, unless the file can never be stored (413).
    await (err instanceof ApiError && err.status === 413 ? part.discard() : part.keep());
    if (err instanceof ApiError) throw err;
    throw new ApiError(
      400,
      'upload_interrupted',
      `The connection closed after ${part.size} bytes; resume from GET …/offset.`,
    );
  }
  part.superseded.removeEventListener('abort', stop);
  if (range && part.size < range.total) {
    await part.keep();
    return { complete: false, receivedBytes: part.size };
  }
  let stored: StoredObject;
  let recorded: boolean;
  try {
    stored = await part.finish();
    recorded = await recordUpload(ctx.knex, jobId, leaseToken, { ...upload, stored });
  } catch (err) {
    await part.discard();
    throw err;
  }
  if (!recorded) {
    await part.discard();
    throw await fenceMissError(ctx.knex, jobId);
  }
  // Should the move fail now, the part stays: its row is committed, so the sweeper moves it.
  await part.commit();
  return { complete: true, stored };
}

/** Appends the request body to the part; with a range, exactly last - first + 1 bytes. */
async function receiveBody(part: PartWriter, body: Readable, range: ContentRange | undefined): Promise<void> {
  const expected = range ? range.last - range.first + 1 : undefined;
  let received = 0;
  for await (const chunk of body) {
    received += (chunk as Buffer).length;
    if (expected !== undefined && received > expected)
      throw badRequest(`The body is longer than its Content-Range (${expected} bytes).`, 'Content-Range');
    await part.write(chunk as Buffer);
  }
  if (expected !== undefined && received < expected) {
    throw badRequest(
      `The body is shorter than its Content-Range (${received} of ${expected} bytes).`,
      'Content-Range',
    );
  }
}

/** Where a resumed upload stands: bytes of its part, or the whole file this attempt already stored. */
export type UploadProgress =
  | { receivedBytes: number; stored?: never }
  | { receivedBytes: number; stored: { name: string; size_bytes: number; sha256: string } };

/**
 * How many bytes of an upload the server holds (0 when none), fenced by the lease. A request still
 * writing the file is stopped first, so the answer is where the worker's next request must start.
 * With no part open, a file of that name this attempt already stored is named beside (`stored`): a
 * worker whose `201` was lost compares its checksum and is done, instead of sending every byte
 * again; `receivedBytes` stays what the part holds (0), where any other upload of the name starts.
 */
export async function uploadOffset(
  ctx: AppContext,
  jobId: string,
  leaseToken: string,
  upload: UploadTarget,
): Promise<UploadProgress> {
  const segments = segmentsOf(jobId, upload);
  ctx.storage.pathFor(segments);
  await assertLeaseHeld(ctx, jobId, leaseToken);
  const receivedBytes = await ctx.storage.receivedBytes(segments);
  if (receivedBytes > 0) return { receivedBytes };
  const stored = await storedThisAttempt(ctx, jobId, leaseToken, upload);
  return stored ? { receivedBytes, stored } : { receivedBytes };
}

/** The job's file of this name, when the lease's attempt recorded it (not an earlier attempt). */
async function storedThisAttempt(ctx: AppContext, jobId: string, leaseToken: string, upload: UploadTarget) {
  const result = await ctx.knex.raw(
    `
    SELECT f.name, f.size_bytes, f.sha256
    FROM files f
    JOIN jobs j ON j.id = f.owner_id
    JOIN job_attempts a ON a.job_id = j.id AND a.attempt = j.attempt
    WHERE f.owner_kind = :kind AND f.owner_id = :jobId AND f.name = :name
      AND j.lease_token = :leaseToken AND f.created_at >= a.started_at`,
    { kind: upload.kind, jobId, name: upload.name, leaseToken },
  );
  const row = result.rows[0] as { name: string; size_bytes: string | number; sha256: string } | undefined;
  return row && { name: row.name, size_bytes: Number(row.size_bytes), sha256: row.sha256 };
}
