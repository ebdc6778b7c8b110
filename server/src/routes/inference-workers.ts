/** The worker side of inference (services/inference.ts): claim a request, report its text. */
import { type BodyOf, pathParam, type Routes, type Schemas } from '../http.js';
import { claimInference, reportInference } from '../services/inference.js';

export const inferenceWorkerRoutes: Routes = {
  async claimInference(req, res, ctx) {
    const body = req.body as BodyOf<'claimInference'>;
    const claimed = await claimInference(ctx, body.worker_id, body.wait_seconds ?? 20, body.backend ?? null);
    if (!claimed) {
      res.status(204).end();
      return;
    }
    res.json(claimed satisfies Schemas['ClaimedInference']);
  },

  async reportInference(req, res, ctx) {
    const { request_token, worker_id, ...chunk } = req.body as BodyOf<'reportInference'>;
    const answer = await reportInference(ctx, worker_id, pathParam(req, 'request_id'), request_token, chunk);
    res.json(answer satisfies Schemas['InferenceReportResponse']);
  },
};
