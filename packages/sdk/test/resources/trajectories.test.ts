import { describe, expect, it } from 'vitest';
import { NotFoundError } from '../../src/index.js';
import { useMockServer } from '../helpers.js';

const { client } = useMockServer();

describe('trajectories', () => {
  it('create, list summaries, retrieve with calls', async () => {
    const trajectories = client().trajectories;
    const created = await trajectories.create({
      source: 'chat',
      llm_calls: [{ model: 'gpt-4o', user_prompt: 'Hi', response: 'Hello', latency_ms: 120 }],
      metadata: { user: 'u1' },
    });
    expect(created).toMatchObject({
      source: 'chat',
      status: 'completed',
      llm_call_count: 1,
      metadata: { user: 'u1' },
    });
    const page = await trajectories.list();
    expect(page.body.available).toBe(true);
    expect(page.data[0]).not.toHaveProperty('llm_calls');
    expect(await trajectories.retrieve(created.id)).toEqual(created);
    await expect(trajectories.get('traj_missing')).rejects.toBeInstanceOf(NotFoundError);
  });
});
