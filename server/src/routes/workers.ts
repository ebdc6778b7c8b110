import type { Request, Response } from 'express';
import type { AppContext } from '../context.js';
import { badRequest, leaseLost } from '../errors.js';
import { type BodyOf, pathParam, type Routes, type Schemas } from '../http.js';
import { acknowledgeCancel } from '../queue/acknowledge-cancel.js';
import { claimJobWithWait, handBack } from '../queue/claim.js';
import type { CallerGone } from '../queue/coalesce.js';
import { completeJob, completeJobs } from '../queue/complete.js';
import { failJob } from '../queue/fail.js';
import { heartbeatGangMember, waitForGang } from '../queue/gang.js';
import { heartbeatJob } from '../queue/heartbeat.js';
import { releaseJob } from '../queue/release.js';
import { reportEvents } from '../queue/report-events.js';
import { reportLogs } from '../queue/report-logs.js';
import { reportMetrics } from '../queue/report-metrics.js';
import type { ClaimedJobRow, JobRow } from '../queue/types.js';
import { parseContentRange, receiveUpload, type UploadTarget, uploadOffset } from '../queue/upload.js';
import { fileForLease, sendStoredFile } from '../services/downloads.js';
import { buildClaimedJob, MissingJobInput } from '../services/job-spec.js';

/** Every worker route names its job in the path. */
const jobIdOf = (req: Request) => pathParam(req, 'job_id');

const transition = (job: Pick<JobRow, 'id' | 'status' | 'run_at'>): Schemas['TransitionResponse'] => ({
  job_id: job.id,
  status: job.status,
  will_retry: job.status === 'pending',
  run_at: job.status === 'pending' ? new Date(job.run_at).toISOString() : null,
});

/**
 * Set when the worker hangs up before the answer, so a long-poll stops handing it jobs. A plain
 * flag: the queue only reads it, and an AbortController for each claim cost ~10 µs of CPU.
 */
function callerGone(res: Response): CallerGone {
  const gone = { aborted: false };
  res.on('close', () => {
    if (!res.writableFinished) gone.aborted = true;
  });
  return gone;
}

/**
 * A worker's upload, streamed from the request body (never parsed or buffered): `201` once the
 * file is whole and stored, `202` after a chunk (a Content-Range that ends before the file does).
 */
async function storeUpload(
  ctx: AppContext,
  req: Request,
  res: Response,
  upload: UploadTarget,
): Promise<void> {
  const leaseToken = req.header('x-lease-token') ?? '';
  const range = parseContentRange(req.header('content-range'), ctx.config.maxUploadBytes);
  const result = await receiveUpload(ctx, jobIdOf(req), leaseToken, upload, req, range);
  if (!result.complete) {
    res.status(202).json({ received_bytes: result.receivedBytes } satisfies Schemas['UploadOffset']);
    return;
  }
  res.status(201).json({
    name: upload.name,
    size_bytes: result.stored.sizeBytes,
    sha256: result.stored.sha256,
  } satisfies Schemas['StoredFile']);
}

/** Where a resumed upload must continue: the bytes the server holds of it. */
async function sendUploadOffset(ctx: AppContext, req: Request, res: Response, upload: UploadTarget) {
  const leaseToken = req.header('x-lease-token') ?? '';
  const { receivedBytes, stored } = await uploadOffset(ctx, jobIdOf(req), leaseToken, upload);
  res.json({ received_bytes: receivedBytes, ...(stored && { stored }) } satisfies Schemas['UploadOffset']);
}

const checkpointStep = (req: Request): number => {
  const step = Number(req.query.step);
  if (!Number.isInteger(step) || step < 0) throw badRequest('step must be a non-negative integer.', 'step');
  return step;
};

/** The failure recorded for a job whose claim answer could not be built (the server's log says why). */
const UNBUILT_CLAIM = {
  code: 'claim_failed',
  message: "The server could not hand this job to a worker; the server's log says why.",
  retryable: true,
};

/**
 * Ends the attempt of a job leased to a worker whose answer could not be built. A job whose input is
 * gone can never run: it ends failed for its owner to see. Anything else (the database failed) fails
 * the attempt, retryable. Not handed back: a release gives the attempt back and makes the job
 * runnable at once, so a job whose answer fails every time was claimed first again and again, ahead
 * of every job behind it; failed, it waits out its backoff and ends failed when its attempts are
 * spent (a one-off failure costs the job an attempt, as a worker's crash would). Why the answer
 * failed is the caller's to log, once.
 */
async function failUnbuiltClaim(ctx: AppContext, job: ClaimedJobRow, err: unknown): Promise<void> {
  if (err instanceof MissingJobInput) {
    await failJob(ctx, job.id, job.lease_token!, {
      code: 'invalid_config',
      message: err.message,
      retryable: false,
    });
    return;
  }
  await failJob(ctx, job.id, job.lease_token!, UNBUILT_CLAIM).catch((failed: unknown) =>
    ctx.logger.error({ err: failed, jobId: job.id }, 'nor could its attempt fail; its lease will expire'),
  );
}

/**
 * What a claim throws for a job whose answer could not be built, for the error handler to answer
 * (500, whatever the cause: app.ts maps the codes and statuses of the error it gets, and this one has
 * none) and to log, with the job's id as a field and the cause as an error of its own (logging.ts).
 */
const unbuiltClaimError = (job: ClaimedJobRow, cause: unknown): Error =>
  Object.assign(new Error(`Job ${job.id} could not be handed to a worker`, { cause }), { jobId: job.id });

/**
 * The claim answers of leased jobs, in order, built side by side (a batch's inputs are looked up at
 * once). A job whose answer could not be built fails its attempt (failUnbuiltClaim) and is left out:
 * the others of its batch still go out. A claim of one job (`single`: not a batch claim that leased
 * one) whose answer failed for a reason other than a missing input answers 500 (unbuiltClaimError).
 */
async function claimAnswers(
  ctx: AppContext,
  jobs: ClaimedJobRow[],
  single: boolean,
): Promise<Schemas['ClaimedJob'][]> {
  const answers = await Promise.all(
    jobs.map(async (job) => {
      try {
        return await buildClaimedJob(ctx, job);
      } catch (err) {
        await failUnbuiltClaim(ctx, job, err);
        if (err instanceof MissingJobInput) return null;
        if (single) throw unbuiltClaimError(job, err);
        ctx.logger.error({ err, jobId: job.id }, 'a batch claim left out a job whose answer failed');
        return null;
      }
    }),
  );
  return answers.filter((answer) => answer !== null);
}

export const workerRoutes: Routes = {
  async claimJob(req, res, ctx) {
    const body = req.body as BodyOf<'claimJob'>;
    const gone = callerGone(res);
    const deadline = Date.now() + (body.wait_seconds ?? 20) * 1000;
    for (;;) {
      const outcome = await claimJobWithWait(
        ctx,
        { workerId: body.worker_id, capabilities: body.capabilities, gang: body.gang },
        Math.max(0, (deadline - Date.now()) / 1000),
        gone,
        body.max_jobs ?? 1,
      );
      if (!outcome) {
        res.status(204).end();
        return;
      }
      if (outcome.gang) {
        const g = outcome.gang;
        res.status(202).json({
          ...g,
          window_expires_at: new Date(g.window_expires_at).toISOString(),
        } satisfies Schemas['GangJoin']);
        return;
      }
      const claimed = await claimAnswers(ctx, outcome.jobs, body.max_jobs === undefined);
      // it hung up while its answer was built: what it would have been handed goes back at once
      if (gone.aborted) {
        const handedOut = new Set(claimed.map((job) => job.job_id));
        await handBack(
          ctx,
          outcome.jobs.filter((job) => handedOut.has(job.id)),
        );
        return;
      }
      // every job it leased could not run (and was failed): this worker gets the next ones
      if (claimed.length === 0) continue;
      // `jobs` only for workers that asked for a batch: older workers read `job` alone
      const batch = body.max_jobs === undefined ? {} : { jobs: claimed };
      res.json({ job: claimed[0]!, ...batch } satisfies Schemas['ClaimResponse']);
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

  async waitGang(req, res, ctx) {
    const body = req.body as BodyOf<'waitGang'>;
    const jobId = jobIdOf(req);
    const outcome = await waitForGang(
      ctx,
      jobId,
      body.member_token,
      body.wait_seconds ?? 20,
      callerGone(res),
    );
    if (outcome.state !== 'started') {
      res.json(outcome satisfies Schemas['GangWaitResponse']);
      return;
    }
    const { place, job } = outcome;
    let claimed: Schemas['ClaimedJob'];
    try {
      // each member downloads with its own token; rank 0's is the job's lease token
      claimed = await buildClaimedJob(ctx, { ...job, lease_token: body.member_token });
    } catch (err) {
      // the gang's attempt ends for every member: the others hear 409 lease_lost on their heartbeats
      await failUnbuiltClaim(ctx, job, err);
      throw err instanceof MissingJobInput ? leaseLost(jobId) : unbuiltClaimError(job, err);
    }
    res.json({
      state: 'started',
      world: place.world,
      joined: place.world,
      gang: place,
      job: claimed,
    } satisfies Schemas['GangWaitResponse']);
  },

  async heartbeatGangMember(req, res, ctx) {
    const body = req.body as BodyOf<'heartbeatGangMember'>;
    const answer = await heartbeatGangMember(ctx, jobIdOf(req), body.member_token);
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
    const name = pathParam(req, 'checkpoint_name');
    await storeUpload(ctx, req, res, { kind: 'checkpoint', name, step: checkpointStep(req) });
  },

  async getJobCheckpointUploadOffset(req, res, ctx) {
    await sendUploadOffset(ctx, req, res, { kind: 'checkpoint', name: pathParam(req, 'checkpoint_name') });
  },

  async uploadJobOutput(req, res, ctx) {
    await storeUpload(ctx, req, res, { kind: 'job_output', name: pathParam(req, 'file') });
  },

  async getJobOutputUploadOffset(req, res, ctx) {
    await sendUploadOffset(ctx, req, res, { kind: 'job_output', name: pathParam(req, 'file') });
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

  async completeJobs(req, res, ctx) {
    const body = req.body as BodyOf<'completeJobs'>;
    const outcomes = await completeJobs(
      ctx,
      body.completions.map((c) => ({ jobId: c.job_id, leaseToken: c.lease_token, result: c.result })),
    );
    const results = outcomes.map(({ jobId, error }): Schemas['CompletionResult'] =>
      error
        ? { job_id: jobId, error: { code: error.code, message: error.message, param: error.param ?? null } }
        : { job_id: jobId, status: 'completed' },
    );
    res.json({ results } satisfies Schemas['CompleteBatchResponse']);
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
    const job = await releaseJob(ctx, jobIdOf(req), body.lease_token, 'worker');
    res.json(transition(job) satisfies Schemas['TransitionResponse']);
  },

  async acknowledgeCancel(req, res, ctx) {
    const body = req.body as BodyOf<'acknowledgeCancel'>;
    const job = await acknowledgeCancel(ctx, jobIdOf(req), body.lease_token);
    res.json(transition(job) satisfies Schemas['TransitionResponse']);
  },
};
