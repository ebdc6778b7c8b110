// Fine-tune a model from a few inline texts and wait for it, printing one line of progress.
//
//   TUNERY_BASE_URL=http://127.0.0.1:8000 TUNERY_API_KEY=tk_… pnpm exec tsx quickstart.ts
import { type TrainingJob, Tunery } from '@tunery/sdk';
import { runAsScript } from './src/run.js';

export interface QuickstartOptions {
  /** Default: a client from TUNERY_BASE_URL and TUNERY_API_KEY. */
  client?: Tunery;
  /** Default: TUNERY_BASE_MODEL, else `tiny-llama`. */
  baseModel?: string;
  pollIntervalMs?: number;
  /** Where progress lines go. Default: console.log. */
  log?: (line: string) => void;
}

const TRAIN_TEXTS = [
  '### Instruction:\nSay hi\n\n### Response:\nhi',
  '### Instruction:\nSay bye\n\n### Response:\nbye',
  '### Instruction:\nSay thanks\n\n### Response:\nthanks',
];

/** `step 12/60 · loss 1.234` */
export function progressLine(job: TrainingJob): string {
  const loss =
    job.current_loss === null || job.current_loss === undefined ? '–' : job.current_loss.toFixed(3);
  return `step ${job.current_step}/${job.total_steps ?? '?'} · loss ${loss}`;
}

export async function main({
  client = new Tunery(),
  baseModel = process.env.TUNERY_BASE_MODEL ?? 'tiny-llama',
  pollIntervalMs = 2000,
  log = console.log,
}: QuickstartOptions = {}): Promise<TrainingJob> {
  let last = '';
  const job = await client.training.jobs.createAndWait(
    {
      base_model: baseModel,
      method: 'lora',
      run_name: 'quickstart',
      train_texts: TRAIN_TEXTS,
      lora_config: { r: 8, lora_alpha: 16 },
      training_config: { max_steps: 60, batch_size: 2, learning_rate: 0.001 },
    },
    {
      pollIntervalMs,
      onProgress: (current) => {
        const line = progressLine(current);
        if (line !== last) log(line);
        last = line;
      },
    },
  );
  // A failed or cancelled job is returned, not thrown.
  if (job.status !== 'completed')
    throw new Error(`Job ${job.id} ${job.status}: ${job.error?.message ?? 'no error'}`);
  log(`done: ${job.id} → adapter ${job.adapter_name}, model ${job.output_model_id}`);
  return job;
}

runAsScript(import.meta.url, () => main());
