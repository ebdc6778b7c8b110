import type { Request, Response } from 'express';
import type { AppContext } from '../context.js';
import { badRequest } from '../errors.js';
import { type BodyOf, pathParam, type Routes, type Schemas } from '../http.js';
import { acknowledgeCancel } from '../queue/acknowledge-cancel.js';
import { claimJobWithWait } from '../queue/claim.js';
import { completeJob } from '../queue/complete.js';
import { failJob } from '../queue/fail.js';
import { heartbeatJob } from '../queue/heartbeat.js';
import { releaseJob } from '../queue/release.js';
import { reportEvents } from '../queue/report-events.js';
import { reportLogs } from '../queue/report-logs.js';
import { reportMetrics } from '../queue/report-metrics.js';
import type { JobRow } from '../queue/types.js';
import { receiveUpload, type UploadKind } from '../queue/upload.js';
import { fileForLease, sendStoredFile } from '../services/downloads.js';
import { buildClaimedJob, MissingJobInput } from '../services/job-spec.js';

/** Every worker route names its job in the path. */
const jobIdOf = (req: Request) => pathParam(req, 'job_id');

const transition = (job: JobRow): Schemas['TransitionResponse'] => ({
  job_id: job.id,
  status: job.status,
  will_retry: job.status === 'pending',
  run_at: job.status === 'pending' ? new Date(job.run_at).toISOString() : null,
});

/** Fires when the worker hangs up before the answer, so a long-poll stops handing it jobs. */
function callerGone(res: Response): AbortSignal {
  const controller = new AbortController();
  res.on('close', () => {
    if (!res.writableFinished) controller.abort();
  });
  return controller.signal;
}

/** A worker's upload, streamed from the request body (never parsed or buffered). */
async function storeUpload(
  ctx: AppContext,
  req: Request,
  res: Response,
  upload: { kind: UploadKind; name: string; step?: number },
): Promise<void> {
  const leaseToken = req.header('x-lease-token') ?? '';
  const stored = await receiveUpload(ctx, jobIdOf(req), leaseToken, upload, req);
  res.status(201).json({
    name: upload.name,
    size_bytes: stored.sizeBytes,
    sha256: stored.sha256,
  } satisfies Schemas['StoredFile']);
}

export const workerRoutes: Routes = {
  async claimJob(req, res, ctx) {
    const body = req.body as BodyOf<'claimJob'>;
    const gone = callerGone(res);
    const deadline = Date.now() + (body.wait_seconds ?? 20) * 1000;
    for (;;) {
      const job = await claimJobWithWait(
        ctx,
        { workerId: body.worker_id, capabilities: body.capabilities },
        Math.max(0, (deadline - Date.now()) / 1000),
        gone,
      );
      if (!job) {
        res.status(204).end();
        return;
      }
      let claimed: Schemas['ClaimedJob'];
      try {
        claimed = await buildClaimedJob(ctx, job);
      } catch (err) {
        if (!(err instanceof MissingJobInput)) throw err;
        // The job can never run: it ends failed for its owner to see, and this worker gets the next one.
        await failJob(ctx, job.id, job.lease_token!, {
          code: 'invalid_config',
          message: err.message,
          retryable: false,
        });
        continue;
      }
      res.json({ job: claimed } satisfies Schemas['ClaimResponse']);
      return;
    }
  },

  async heartbeatJob(req, res, ctx) {
    const body = req.body as BodyOf<'heartbeatJob'>;
    const answer = await heartbeatJob(ctx, jobIdOf(req), body.lease_token, body.progress);
    res.json({
      lease_expires_at: new Date(answer.lease_expires_at).toISOString(),
      cancel_requested: answer.cancel_requested,
    } satisfies Schemas['HeartbeatResponse']);
  },

  async reportJobLogs(req, res, ctx) {
    const body = req.body as BodyOf<'reportJobLogs'>;
    res.json(
      (await reportLogs(ctx, jobIdOf(req), body.lease_token, body.lines)) satisfies Schemas['ReportAccepted'],
    );
  },

  async reportJobMetrics(req, res, ctx) {
    const body = req.body as BodyOf<'reportJobMetrics'>;
    res.json(
      (await reportMetrics(
        ctx,
        jobIdOf(req),
        body.lease_token,
        body.points,
      )) satisfies Schemas['ReportAccepted'],
    );
  },

  async reportJobEvents(req, res, ctx) {
    const body = req.body as BodyOf<'reportJobEvents'>;
    res.json(
      (await reportEvents(ctx, jobIdOf(req), body.lease_token, body)) satisfies Schemas['ReportAccepted'],
    );
  },

  async uploadJobCheckpoint(req, res, ctx) {
    const step = Number(req.query.step);
    if (!Number.isInteger(step) || step < 0) throw badRequest('step must be a non-negative integer.', 'step');
    await storeUpload(ctx, req, res, { kind: 'checkpoint', name: pathParam(req, 'checkpoint_name'), step });
  },

  async uploadJobOutput(req, res, ctx) {
    await storeUpload(ctx, req, res, { kind: 'job_output', name: pathParam(req, 'file') });
  },

  async downloadWorkerFile(req, res, ctx) {
    const file = await fileForLease(ctx, pathParam(req, 'file_id'), req.header('x-lease-token') ?? '');
    await sendStoredFile(ctx, req, res, file);
  },

  async completeJob(req, res, ctx) {
    const body = req.body as BodyOf<'completeJob'>;
    const job = await completeJob(ctx, jobIdOf(req), body.lease_token, body.result);
    res.json(transition(job) satisfies Schemas['TransitionResponse']);
  },

  async failJob(req, res, ctx) {
    const body = req.body as BodyOf<'failJob'>;
    const job = await failJob(ctx, jobIdOf(req), body.lease_token, {
      code: body.error.code,
      message: body.error.message,
      retryable: body.retryable ?? true,
    });
    res.json(transition(job) satisfies Schemas['TransitionResponse']);
  },

  async releaseJob(req, res, ctx) {
    const body = req.body as BodyOf<'releaseJob'>;
    const job = await releaseJob(ctx, jobIdOf(req), body.lease_token);
    res.json(transition(job) satisfies Schemas['TransitionResponse']);
  },

  async acknowledgeCancel(req, res, ctx) {
    const body = req.body as BodyOf<'acknowledgeCancel'>;
    const job = await acknowledgeCancel(ctx, jobIdOf(req), body.lease_token);
    res.json(transition(job) satisfies Schemas['TransitionResponse']);
  },
};
