// Distil a teacher into a small student, wait for it, and print where the artifacts are.
//
//   TUNERY_BASE_URL=http://127.0.0.1:8000 TUNERY_API_KEY=tk_… pnpm exec tsx distill.ts
import { type DistillationArtifacts, type DistillationJob, Tunery } from '@tunery/sdk';
import { runAsScript } from './src/run.js';

export interface DistillOptions {
  /** Default: a client from TUNERY_BASE_URL and TUNERY_API_KEY. */
  client?: Tunery;
  /** Default: TUNERY_TEACHER_MODEL, else a local teacher (`local/tiny-llama`) that needs no network. */
  teacherModel?: string;
  /** Default: TUNERY_BASE_MODEL, else `tiny-llama`. */
  studentModel?: string;
  pollIntervalMs?: number;
  log?: (line: string) => void;
}

const PROMPTS = [
  'Classify the ticket: "The printer is on fire."',
  'Classify the ticket: "I forgot my password."',
  'Classify the ticket: "Please cancel my subscription."',
];

export async function main({
  client = new Tunery(),
  teacherModel = process.env.TUNERY_TEACHER_MODEL ?? 'local/tiny-llama',
  studentModel = process.env.TUNERY_BASE_MODEL ?? 'tiny-llama',
  pollIntervalMs = 2000,
  log = console.log,
}: DistillOptions = {}): Promise<{ job: DistillationJob; artifacts: DistillationArtifacts }> {
  let lastPhase = '';
  const job = await client.distillation.createAndWait(
    {
      name: 'ticket-triage (example)',
      config: {
        teacher_model: teacherModel,
        student_model: studentModel,
        prompts: PROMPTS,
        n_samples: 2,
        training_steps: 10,
        export_gguf: false,
      },
    },
    {
      pollIntervalMs,
      onProgress: (current) => {
        if (current.phase !== lastPhase) log(`phase ${current.phase} · $${current.cost_accrued.toFixed(4)}`);
        lastPhase = current.phase;
      },
    },
  );
  if (job.status !== 'completed')
    throw new Error(`Job ${job.id} ${job.status}: ${job.error?.message ?? 'no error'}`);
  const artifacts = await client.distillation.artifacts(job.id);
  log(`adapter: ${artifacts.adapter_path}`);
  for (const [quantization, path] of Object.entries(artifacts.gguf_paths))
    log(`gguf ${quantization}: ${path}`);
  for (const file of artifacts.files) log(`${file.name} (${file.size_bytes} bytes) ${file.download_url}`);
  return { job, artifacts };
}

runAsScript(import.meta.url, () => main());
