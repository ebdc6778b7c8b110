import type { components } from '../../generated/api.js';
import {
  badJson,
  idempotencyKeyOf,
  type MockContext,
  newestFirst,
  pageOf,
  remember,
  replayed,
} from '../context.js';
import { notFound } from '../errors.js';
import { type MockState, newId, now } from '../state.js';
import { storeDataset } from './datasets.js';
import { createTrainingJob } from './training.js';

type Schemas = components['schemas'];

export function trajectoryHandlers(ctx: MockContext) {
  const { router, state } = ctx;

  router.post('/v1/trajectories', 'createTrajectory', async ({ request, response }) => {
    const body = await request.json().catch(badJson);
    const key = idempotencyKeyOf(request, body);
    const earlier = replayed(ctx, 'createTrajectory', key, body);
    if (earlier) return response(201).json(trajectory(state, earlier.id));
    const id = newId(state, 'traj');
    const created: Schemas['Trajectory'] = {
      id,
      source: body.source ?? 'api',
      status: body.status ?? 'completed',
      llm_call_count: body.llm_calls.length,
      start_time: body.start_time ?? null,
      end_time: body.end_time ?? null,
      created_at: now(),
      llm_calls: body.llm_calls,
      provider_accesses: body.provider_accesses ?? [],
      metadata: body.metadata ?? {},
    };
    state.trajectories.set(id, created);
    remember(ctx, 'createTrajectory', key, body, { kind: 'trajectory', id });
    maybeAutoTrain(state);
    return response(201).json(created);
  });

  router.get('/v1/trajectories', 'listTrajectories', ({ request, response }) => {
    const summaries = newestFirst(state.trajectories.values()).map(
      ({ llm_calls: _calls, provider_accesses: _accesses, metadata: _metadata, ...summary }) => summary,
    );
    const { page, ...paging } = pageOf(summaries, request.url);
    return response(200).json({ trajectories: page, ...paging, available: true });
  });

  router.get('/v1/trajectories/{trajectory_id}', 'getTrajectory', ({ params, response }) =>
    response(200).json(trajectory(state, params.trajectory_id)),
  );
}

function trajectory(state: MockState, id: string): Schemas['Trajectory'] {
  const found = state.trajectories.get(id);
  if (!found) throw notFound('trajectory', id, 'trajectory_id');
  return found;
}

/** Auto-training: enough new trajectories and the cooldown over → build a dataset and fine-tune on it. */
function maybeAutoTrain(state: MockState) {
  const auto = state.autoConfig;
  auto.trajectories_since_last_run += 1;
  if (!auto.enabled || !auto.base_model || auto.trajectories_since_last_run < auto.threshold) return;
  const cooledDown =
    !auto.last_run_at || Date.now() - Date.parse(auto.last_run_at) >= auto.cooldown_hours * 3_600_000;
  if (!cooledDown) return;
  const recent = newestFirst(state.trajectories.values()).slice(0, auto.trajectories_since_last_run);
  const records = recent.flatMap((t) =>
    t.llm_calls.map((call) => ({
      messages: [
        { role: 'user' as const, content: call.user_prompt ?? '' },
        { role: 'assistant' as const, content: call.response ?? '' },
      ],
    })),
  );
  if (records.length === 0) return;
  const data = storeDataset(state, {
    name: 'auto-training',
    records,
    source: 'trajectories',
    trajectoryCount: recent.length,
  });
  const job = createTrainingJob(state, {
    base_model: auto.base_model,
    dataset_id: data.id,
    run_name: 'auto-training',
  });
  auto.last_run_at = now();
  auto.last_job_id = job.id;
  auto.trajectories_since_last_run = 0;
}
