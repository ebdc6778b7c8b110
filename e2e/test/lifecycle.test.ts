// The life of a job on the real server (embedded PGlite) and a CPU worker, driven through the SDK:
// a LoRA fine-tune from submit to merged model, the runnable examples (quickstart, and distill with a
// local teacher, so nothing leaves the machine), and a cancel. One server and worker for the file.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { main as distill } from '@tunery/examples/distill.js';
import { main as quickstart } from '@tunery/examples/quickstart.js';
import type { MetricPoint, TrainingJob } from '@tunery/sdk';
import { describe, expect, it } from 'vitest';
import { TRAIN_TEXTS } from '../src/data.js';
import { readAll, sha256, until } from '../src/stack.js';
import { TINY, useStack } from '../src/use-stack.js';

// A 6 s lease: the worker heartbeats every 2 s, so a cancel reaches it within about 2 s.
const stack = useStack({ name: 'lifecycle', database: 'pglite', leaseSeconds: 6 });

const STEPS = 30;

async function allMetrics(jobId: string): Promise<MetricPoint[]> {
  const page = await stack().client.training.jobs.metrics(jobId, { since_step: -1, limit: 1000 });
  return page.points;
}

describe('live LoRA fine-tune', () => {
  let job: TrainingJob;

  it('trains through the SDK: completed, loss fell, metrics, logs and events recorded', async () => {
    const { client } = stack();
    const created = await client.training.jobs.create({
      base_model: TINY,
      method: 'lora',
      run_name: 'e2e-finetune',
      train_texts: TRAIN_TEXTS,
      lora_config: { r: 8, lora_alpha: 16 },
      training_config: {
        max_steps: STEPS,
        batch_size: 4,
        learning_rate: 0.01,
        save_steps: 10,
        eval_steps: 10,
        eval_split: 0.2,
        logging_steps: 1,
      },
    });
    expect(created.status).toBe('pending');
    job = await client.training.jobs.waitForCompletion(created.id, { pollIntervalMs: 250, timeout: 90_000 });
    expect(job, JSON.stringify(job.error)).toMatchObject({
      status: 'completed',
      current_step: STEPS,
      total_steps: STEPS,
      retries: 0,
      last_checkpoint_step: STEPS,
    });

    const points = await allMetrics(job.id);
    const train = points.filter((p) => p.phase === 'train');
    expect(train.map((p) => p.step)).toEqual(Array.from({ length: STEPS }, (_, i) => i + 1));
    expect(points.some((p) => p.phase === 'eval' && typeof p.eval_loss === 'number')).toBe(true);
    const firstLoss = train[0]!.loss!;
    const lastLoss = train.at(-1)!.loss!;
    expect(lastLoss).toBeLessThan(firstLoss * 0.75);

    const result = await client.training.jobs.result(job.id);
    expect(result.loss_final).toBeCloseTo(lastLoss, 4);
    expect(result.ppl_final!).toBeLessThan(result.ppl_baseline!);
    expect(result.tokens_processed).toBeGreaterThan(0);
    expect(result.params_trainable).toBeGreaterThan(0);

    const logs = await client.training.jobs.logs(job.id);
    expect(logs.lines.length).toBeGreaterThan(STEPS);
    expect(logs.lines.some((l) => l.text.includes(`step ${STEPS}/${STEPS}`))).toBe(true);
    const seqs = logs.lines.map((l) => l.seq);
    expect(new Set(seqs).size).toBe(seqs.length);

    const { events } = await client.training.jobs.events(job.id);
    const kinds = events.map((e) => e.kind);
    expect(kinds).toEqual(expect.arrayContaining(['checkpoint', 'completed']));

    const { checkpoints } = await client.training.jobs.checkpoints(job.id);
    expect(checkpoints.map((c) => c.step)).toEqual([10, 20, 30]);
  });

  it('lists every output file, each downloadable with the listed sha256; Range answers 206', async () => {
    const { client } = stack();
    const outputs = await client.training.jobs.outputs(job.id);
    const names = outputs.files.map((f) => f.name);
    expect(names).toEqual(
      expect.arrayContaining(['adapter_model.safetensors', 'adapter_config.json', 'training_config.json']),
    );
    expect(outputs.total_files).toBe(outputs.files.length);
    const bytes = new Map<string, Buffer>();
    for (const file of outputs.files) {
      const body = await readAll(await client.training.jobs.download(job.id, file.name));
      expect(body.length, file.name).toBe(file.size_bytes);
      expect(sha256(body), file.name).toBe(file.sha256);
      bytes.set(file.name, body);
    }

    const full = bytes.get('adapter_model.safetensors')!;
    const { data, response } = await client.training.jobs
      .download(job.id, 'adapter_model.safetensors', { range: 'bytes=100-1123' })
      .withResponse();
    expect(response.status).toBe(206);
    expect(response.headers.get('content-range')).toBe(`bytes 100-1123/${full.length}`);
    const slice = await readAll(data);
    expect(slice.equals(full.subarray(100, 1124))).toBe(true);

    const { data: rest, response: restResponse } = await client.training.jobs
      .download(job.id, 'adapter_model.safetensors', { range: `bytes=${full.length - 10}-` })
      .withResponse();
    expect(restResponse.status).toBe(206);
    expect((await readAll(rest)).equals(full.subarray(full.length - 10))).toBe(true);
  });

  it('registers the adapter and the output model', async () => {
    const { client, dataDir } = stack();
    const adapters = [];
    for await (const adapter of client.adapters.list()) adapters.push(adapter);
    const adapter = adapters.find((a) => a.job_id === job.id);
    expect(adapter, JSON.stringify(adapters)).toBeDefined();
    expect(adapter!.name).toBe(job.adapter_name);
    // Paths are shown relative to the server's data directory, never as the server's absolute paths.
    expect(adapter!.path).toBe(`files/jobs/${job.id}/outputs`);
    expect(existsSync(join(dataDir, adapter!.path, 'adapter_model.safetensors'))).toBe(true);

    const models = [];
    for await (const model of client.models.list()) models.push(model);
    const model = models.find((m) => m.job_id === job.id);
    expect(model, JSON.stringify(models)).toMatchObject({ id: job.output_model_id, kind: 'adapter' });
  });

  it('merges the adapter into the base model: a merge job whose safetensors download', async () => {
    const { client } = stack();
    const { merge_job_id: mergeId } = await client.training.jobs.merge(job.id);
    const merged = await client.training.jobs.waitForCompletion(mergeId, {
      pollIntervalMs: 250,
      timeout: 60_000,
    });
    expect(merged, JSON.stringify(merged.error)).toMatchObject({ status: 'completed', type: 'merge' });
    const outputs = await client.training.jobs.outputs(mergeId);
    const weights = outputs.files.find((f) => f.name.endsWith('.safetensors'));
    expect(weights, JSON.stringify(outputs.files)).toBeDefined();
    const body = await readAll(await client.training.jobs.download(mergeId, weights!.name));
    expect(body.length).toBe(weights!.size_bytes);
    expect(sha256(body)).toBe(weights!.sha256);
    // A safetensors file opens with the little-endian length of its JSON header, then the header.
    const headerLength = Number(body.readBigUInt64LE(0));
    expect(JSON.parse(body.subarray(8, 8 + headerLength).toString('utf8'))).toBeTypeOf('object');

    const models = [];
    for await (const model of client.models.list()) models.push(model);
    expect(models.find((m) => m.job_id === mergeId)).toMatchObject({ kind: 'merged' });
  });
});

describe('examples against the live server', () => {
  it('quickstart fine-tunes tiny-llama and prints its progress', async () => {
    const { client } = stack();
    const lines: string[] = [];
    const job = await quickstart({ client, baseModel: TINY, pollIntervalMs: 250, log: (l) => lines.push(l) });
    expect(job).toMatchObject({ status: 'completed', current_step: 60, total_steps: 60 });
    expect(lines.at(-1)).toBe(`done: ${job.id} → adapter ${job.adapter_name}, model ${job.output_model_id}`);
    expect(lines.some((l) => /^step 60\/60 · loss \d+\.\d{3}$/.test(l))).toBe(true);
    const adapter = await client.adapters.retrieve(job.adapter_name!);
    expect(adapter.job_id).toBe(job.id);
  });

  it('distill runs a local teacher through every phase and its artifacts download', async () => {
    const { client } = stack();
    const lines: string[] = [];
    const { job, artifacts } = await distill({
      client,
      teacherModel: `local/${TINY}`,
      studentModel: TINY,
      pollIntervalMs: 250,
      log: (l) => lines.push(l),
    });
    expect(job, JSON.stringify(job.error)).toMatchObject({ status: 'completed', phase: 'done' });
    expect(job.cost_accrued).toBeGreaterThanOrEqual(0);
    // Every phase, from the recorded timeline: a 250 ms poll may well miss a phase that takes less.
    const { events } = await client.distillation.events(job.id);
    const phases = events.filter((e) => e.kind === 'phase').map((e) => e.payload.phase);
    // In the order first entered (a retried attempt, on a loaded machine, would enter them again).
    expect([...new Set(phases)]).toEqual([
      'initializing',
      'data_generation',
      'curation',
      'training',
      'export',
    ]);
    expect(events.at(-1)?.kind).toBe('completed');
    // The worker's console and per-step metrics, through the same protocol calls as training's.
    const { lines: logLines } = await client.distillation.logs(job.id);
    expect(logLines.some((l) => /^step \d+\/\d+ · loss /.test(l.text))).toBe(true);
    const metrics = await client.distillation.metrics(job.id);
    expect(metrics.latest_step).toBe((job.results as { steps: number }).steps);
    expect(metrics.points.every((p) => p.phase === 'train' && Number.isFinite(p.loss))).toBe(true);
    // What the example printed is what its polls saw: the last of it is always `done`.
    expect(lines.filter((l) => l.startsWith('phase ')).at(-1)).toMatch(/^phase done /);
    expect(lines).toContain(`adapter: ${artifacts.adapter_path}`);
    expect(existsSync(join(stack().dataDir, artifacts.adapter_path!, 'adapter_model.safetensors'))).toBe(
      true,
    );

    const names = artifacts.files.map((f) => f.name);
    expect(names).toEqual(expect.arrayContaining(['adapter_model.safetensors', 'curated_pairs.jsonl']));
    const pairs = artifacts.files.find((f) => f.name === 'curated_pairs.jsonl')!;
    const body = await readAll(await client.distillation.downloadArtifact(job.id, pairs.name));
    expect(sha256(body)).toBe(pairs.sha256);
    const records = body
      .toString('utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(records.length).toBeGreaterThan(0);
  });
});

describe('live cancel', () => {
  it('stops the worker; the job ends cancelled with its partial outputs kept', async () => {
    const { client } = stack();
    const created = await client.training.jobs.create({
      base_model: TINY,
      method: 'lora',
      run_name: 'e2e-cancel',
      train_texts: TRAIN_TEXTS,
      training_config: { max_steps: 5000, batch_size: 2, save_steps: 5, logging_steps: 1 },
    });
    await until(
      'the first checkpoint',
      async () => (await client.training.jobs.retrieve(created.id)).last_checkpoint_step > 0,
      { timeoutMs: 60_000 },
    );
    const cancelling = await client.training.jobs.cancel(created.id);
    expect(cancelling.status === 'running' && cancelling.cancel_requested).toBe(true);
    const job = await client.training.jobs.waitForCompletion(created.id, {
      pollIntervalMs: 250,
      timeout: 60_000,
    });
    expect(job.status).toBe('cancelled');
    expect(job.finished_at).toBeTruthy();
    // The timeline: the request, then the worker's acknowledgement, which ends it.
    const kinds = (await client.training.jobs.events(job.id)).events.map((e) => e.kind);
    expect(kinds.filter((k) => k === 'cancel_requested')).toHaveLength(1);
    expect(kinds.indexOf('cancel_requested')).toBeLessThan(kinds.indexOf('cancelled'));
    expect(kinds.at(-1)).toBe('cancelled');

    const train = (await allMetrics(job.id)).filter((p) => p.phase === 'train');
    const lastStep = train.at(-1)!.step;
    expect(lastStep).toBeLessThan(5000);
    // Partial outputs kept: the checkpoints, the last one written at the very step the worker stopped.
    const { checkpoints } = await client.training.jobs.checkpoints(job.id);
    expect(checkpoints.length).toBeGreaterThan(0);
    expect(checkpoints.at(-1)!.step).toBe(lastStep);
    expect(job.last_checkpoint_step).toBe(lastStep);
    const outputs = await client.training.jobs.outputs(job.id);
    expect(outputs.status).toBe('cancelled');
    const logs = await client.training.jobs.logs(job.id);
    expect(logs.lines.some((l) => l.text === 'cancelled')).toBe(true);

    // The worker is free again: it takes the next job.
    const next = await client.training.jobs.create({
      base_model: TINY,
      method: 'lora',
      train_texts: TRAIN_TEXTS,
      training_config: { max_steps: 2, batch_size: 2 },
    });
    const after = await client.training.jobs.waitForCompletion(next.id, {
      pollIntervalMs: 250,
      timeout: 60_000,
    });
    expect(after.status).toBe('completed');
  });
});

describe('live grow, contract and benchmark', () => {
  it('runs each type to completion on the tiny model, with the result its type reports', async () => {
    const { client } = stack();
    const wait = (id: string) =>
      client.training.jobs.waitForCompletion(id, { pollIntervalMs: 250, timeout: 120_000 });
    const grow = await client.training.jobs.create({
      type: 'train',
      base_model: TINY,
      train_texts: TRAIN_TEXTS,
      hyperparams: { turns: 1, cycles: 1, steps_per_cycle: 2, new_layers: 1 },
    });
    const contract = await client.training.jobs.create({
      type: 'contract',
      base_model: TINY,
      hyperparams: { contraction_ratio: 0.5, num_layers_to_contract: 1 },
    });
    const grown = await wait(grow.id);
    expect(grown, JSON.stringify(grown.error)).toMatchObject({ status: 'completed', type: 'train' });
    const growth = (await client.training.jobs.result(grow.id)).details!;
    expect(growth.layers_after).toBeGreaterThan(growth.layers_before!);
    const contracted = await wait(contract.id);
    expect(contracted, JSON.stringify(contracted.error)).toMatchObject({
      status: 'completed',
      type: 'contract',
    });
    expect((await client.training.jobs.result(contract.id)).details!.removed_layers).toHaveLength(1);

    const bench = await client.training.jobs.create({
      type: 'benchmark',
      source_model_id: grown.output_model_id!,
      train_texts: TRAIN_TEXTS,
    });
    const benchmarked = await wait(bench.id);
    expect(benchmarked, JSON.stringify(benchmarked.error)).toMatchObject({
      status: 'completed',
      type: 'benchmark',
    });
    expect((await client.training.jobs.result(bench.id)).scores).toBeTruthy();
  });
});

describe('the server says what it sends', () => {
  it('answers every read of every job of this run (each type) only with fields the spec declares', async () => {
    const { client, responses } = stack();
    const types = new Set<string>();
    for await (const job of client.training.jobs.list()) {
      types.add(job.type);
      const jobs = client.training.jobs;
      await jobs.retrieve(job.id);
      await jobs.logs(job.id);
      await jobs.metrics(job.id);
      await jobs.events(job.id);
      await jobs.checkpoints(job.id);
      await jobs.outputs(job.id);
      if (job.status === 'completed') await jobs.result(job.id);
    }
    for await (const job of client.distillation.list()) {
      types.add('distillation');
      await client.distillation.retrieve(job.id);
      await client.distillation.events(job.id);
      await client.distillation.logs(job.id);
      await client.distillation.metrics(job.id);
      await client.distillation.checkpoints(job.id);
      await client.distillation.artifacts(job.id);
    }
    for await (const _ of client.adapters.list());
    for await (const _ of client.models.list());
    for await (const _ of client.datasets.list());
    for await (const _ of client.trajectories.list());
    // error answers are checked too
    await expect(client.training.jobs.retrieve('job_missing')).rejects.toMatchObject({ status: 404 });
    expect([...types].sort()).toEqual([
      'benchmark',
      'contract',
      'distillation',
      'finetune',
      'merge',
      'train',
    ]);
    expect(await responses.problems()).toEqual([]);
  });
});
