import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConflictError, type DistillationJob, Distiller, PermissionDeniedError } from '../../src/index.js';
import { BASE_URL, useMockServer } from '../helpers.js';

const { mock, client } = useMockServer();

const config = {
  teacher_model: 'openai/gpt-4o',
  teacher_api_key: 'sk-secret',
  student_model: 'tiny-llama',
  prompts: ['Triage: printer on fire', 'Triage: password reset'],
  training_steps: 10,
  export_gguf: true,
  quantization_types: ['q4_k_m', 'q8_0'] as ('q4_k_m' | 'q8_0')[],
};

describe('Distiller', () => {
  it('works on its own with the client options', async () => {
    const distiller = new Distiller({ baseURL: BASE_URL, apiKey: 'tk_x', logLevel: 'off' });
    const job = await distiller.create({ name: 'triage', config });
    expect(job).toMatchObject({ name: 'triage', status: 'pending', phase: 'initializing' });
    expect(job.config).not.toHaveProperty('teacher_api_key');
    expect(mock.state.requests[0]?.headers.authorization).toBe('Bearer tk_x');
    expect(mock.state.requests[0]?.headers['idempotency-key']).toBeDefined();
  });

  it('create → retrieve → list → cancel stay consistent', async () => {
    const distiller = client().distillation;
    const job = await distiller.create({ config });
    expect(await distiller.retrieve(job.id)).toEqual(job);
    const listed: DistillationJob[] = [];
    for await (const j of distiller.list({ limit: 1 })) listed.push(j);
    expect(listed.map((j) => j.id)).toEqual([job.id]);
    expect((await distiller.list({ status: 'completed' })).data).toEqual([]);
    expect(await distiller.cancel(job.id)).toMatchObject({ status: 'cancelled' });
    await expect(distiller.cancel(job.id)).rejects.toBeInstanceOf(ConflictError);
  });

  it('waits through the phases to the artifacts, and downloads one', async () => {
    const distiller = client().distillation;
    const job = await distiller.create({ config });
    const phases: string[] = [];
    const worker = setInterval(() => mock.tickJob(job.id), 2);
    const done = await distiller.waitForCompletion(job.id, {
      pollIntervalMs: 1,
      onProgress: (j) => {
        if (phases.at(-1) !== j.phase) phases.push(j.phase);
      },
    });
    clearInterval(worker);
    expect(done).toMatchObject({ status: 'completed', phase: 'done' });
    expect(done.cost_accrued).toBeGreaterThan(0);
    expect(phases.at(-1)).toBe('done');
    // The timeline holds every phase, whichever of them the polls happened to see.
    const { events } = await distiller.events(job.id);
    const entered = events.filter((e) => e.kind === 'phase').map((e) => e.payload.phase);
    expect(entered).toEqual(['data_generation', 'curation', 'training', 'export', 'done']);
    const later = await distiller.events(job.id, { since: events.at(-2)!.seq });
    expect(later.events).toEqual([events.at(-1)]);

    const artifacts = await distiller.artifacts(job.id);
    expect(Object.keys(artifacts.gguf_paths).sort()).toEqual(['q4_k_m', 'q8_0']);
    expect(artifacts.adapter_path).toBe(`files/jobs/${job.id}/outputs/`);
    const file = artifacts.files.find((f) => f.name === 'model-q4_k_m.gguf');
    expect(file?.download_url).toBe(`/v1/distillation/${job.id}/artifacts/model-q4_k_m.gguf`);

    const stream = await distiller.downloadArtifact(job.id, 'model-q4_k_m.gguf', { range: 'bytes=-16' });
    expect(new Uint8Array(await new Response(stream).arrayBuffer())).toHaveLength(16);
    const dir = await mkdtemp(join(tmpdir(), 'tunery-'));
    try {
      const path = join(dir, 'student.gguf');
      expect(await distiller.downloadArtifactToFile(job.id, 'model-q4_k_m.gguf', path)).toBe(
        file?.size_bytes,
      );
      expect((await readFile(path)).length).toBe(file?.size_bytes);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('createAndWait with mock.advanceJob by phase', async () => {
    const distiller = client().distillation;
    const pending = distiller.createAndWait(
      { config: { ...config, export_gguf: false } },
      { pollIntervalMs: 1 },
    );
    await new Promise((r) => setTimeout(r, 20));
    const [id] = mock.state.distillationJobs.keys();
    mock.advanceJob(id!, 'curation');
    expect(mock.state.distillationJobs.get(id!)).toMatchObject({ status: 'running', phase: 'curation' });
    mock.advanceJob(id!, 'done');
    const done = await pending;
    expect(done.status).toBe('completed');
    expect((await distiller.artifacts(id!)).gguf_paths).toEqual({});
  });

  it('refuses another tenant', async () => {
    await expect(client().distillation.list({ tenant_id: 'someone-else' })).rejects.toBeInstanceOf(
      PermissionDeniedError,
    );
  });
});
