import { describe, expect, it } from 'vitest';
import TuneryDefault, {
  Adapters,
  BaseModels,
  BudgetResource,
  Datasets,
  Distiller,
  Models,
  Trainer,
  Trajectories,
  Tunery,
} from '../src/index.js';
import { useMockServer } from './helpers.js';

const { client } = useMockServer();

describe('Tunery', () => {
  it('holds every resource on one client', () => {
    const tunery = client();
    expect(TuneryDefault).toBe(Tunery);
    expect(tunery.distillation).toBeInstanceOf(Distiller);
    expect(tunery.training).toBeInstanceOf(Trainer);
    expect(tunery.datasets).toBeInstanceOf(Datasets);
    expect(tunery.trajectories).toBeInstanceOf(Trajectories);
    expect(tunery.adapters).toBeInstanceOf(Adapters);
    expect(tunery.models).toBeInstanceOf(Models);
    expect(tunery.baseModels).toBeInstanceOf(BaseModels);
    expect(tunery.budget).toBeInstanceOf(BudgetResource);
  });

  it('reads health and version', async () => {
    const tunery = client();
    expect(await tunery.health()).toEqual({ status: 'ok', database: 'pglite' });
    expect(await tunery.version()).toMatchObject({ api_version: '0.1.0' });
  });
});
