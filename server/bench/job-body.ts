/** A training job as a user submits one (seed 003's shape): inline texts, LoRA and training configs. */
export const CREATE_JOB_BODY = {
  model_name: 'smollm2-135m-instruct',
  train_texts: [
    '### Instruction:\nSay hi\n\n### Response:\nhi',
    '### Instruction:\nName a colour\n\n### Response:\nblue',
  ],
  lora_config: { r: 16, lora_alpha: 32, lora_dropout: 0.05, target_modules: ['q_proj', 'v_proj'] },
  training_config: { num_epochs: 3, batch_size: 4, learning_rate: 0.0002, max_steps: 100, save_steps: 50 },
  output_dir: './bench-output',
};
