/** Short instruction/response pairs a tiny model memorises in a few dozen steps. */
export const TRAIN_TEXTS = [
  ['Say hi', 'hi'],
  ['Say bye', 'bye'],
  ['Say thanks', 'thanks'],
  ['Name a colour', 'blue'],
  ['Name a fruit', 'apple'],
  ['Name an animal', 'cat'],
  ['What is 2 + 2?', '4'],
  ['What is 3 + 3?', '6'],
  ['Capital of France?', 'Paris'],
  ['Capital of Italy?', 'Rome'],
].map(([instruction, response]) => `### Instruction:\n${instruction}\n\n### Response:\n${response}`);
