/**
 * The code sample of every operation in openapi/openapi.yaml, as Redoc's x-codeSamples: @tunery/sdk
 * calls derived from the SDK's own resource classes (so a renamed method shows up without anyone
 * editing the docs), the `openai` client for the OpenAI-compatible surface, curl for the worker
 * protocol. scripts/build-docs.ts renders them; packages/sdk/test/docs-samples.test.ts type-checks them.
 */
// Callers pass the parsed spec and the repository root: the root package has no YAML parser, and the
// SDK's type-check (which imports this file from its tests) compiles it as CommonJS, without import.meta.
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';

export interface CodeSample {
  lang: string;
  label: string;
  source: string;
}

/** Where each resource class hangs on a `Tunery` client. */
const ACCESSORS: Record<string, string> = {
  Tunery: 'tunery',
  Distiller: 'tunery.distillation',
  Trainer: 'tunery.training',
  Jobs: 'tunery.training.jobs',
  Templates: 'tunery.training.templates',
  AutoConfig: 'tunery.training.autoConfig',
  Datasets: 'tunery.datasets',
  Trajectories: 'tunery.trajectories',
  Adapters: 'tunery.adapters',
  Models: 'tunery.models',
  BaseModels: 'tunery.baseModels',
  BudgetResource: 'tunery.budget',
  ApiKeys: 'tunery.admin.keys',
  Webhooks: 'tunery.webhooks',
};

/** Operations kept for seed compatibility, which the SDK serves through another method. */
const SAME_AS: Record<string, SdkMethod> = {
  'delete /v1/training/jobs/{job_id}': { call: 'tunery.training.jobs.cancel', iterable: false },
};

interface SdkMethod {
  call: string;
  iterable: boolean;
}

function sourceFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const full = join(dir, name);
    return statSync(full).isDirectory() ? sourceFiles(full) : full.endsWith('.ts') ? [full] : [];
  });
}

/**
 * `post /v1/training/jobs` → `tunery.training.jobs.create`, read from the SDK's source;
 * `post /v1/datasets multipart` → `tunery.datasets.upload`.
 */
function sdkMethods(root: string): Map<string, SdkMethod> {
  const methods = new Map<string, SdkMethod>();
  const files = [
    join(root, 'packages/sdk/src/client.ts'),
    ...sourceFiles(join(root, 'packages/sdk/src/resources')),
  ];
  for (const file of files) {
    let className = '';
    let methodName = '';
    let methodText = ''; // from the method's first line on, so its return type is in it
    for (const line of readFileSync(file, 'utf8').split('\n')) {
      const cls = /^export class (\w+)/.exec(line);
      if (cls) className = cls[1]!;
      const method = /^ {2}(?:async )?(\w+)\(/.exec(line);
      if (method) [methodName, methodText] = [method[1]!, ''];
      methodText += line;
      const call =
        /(?:this\._client|this)\.(get|post|put|delete|patch|getList|getStream)\('(\/v1[^']*)'/.exec(line);
      if (call && className in ACCESSORS) {
        const verb = call[1]!.replace(/^get(List|Stream)$/, 'get');
        // A multipart body (an upload) gets its own key: the same operation also takes JSON.
        const key = `${verb} ${call[2]}${/\{ multipart\b/.test(line) ? ' multipart' : ''}`;
        // Pages and event streams are read with `for await`; the rest (downloads too) answer one value.
        const iterable = call[1] === 'getList' || /\):\s*Async(Generator|Iterable)</.test(methodText);
        if (!methods.has(key)) methods.set(key, { call: `${ACCESSORS[className]}.${methodName}`, iterable });
      }
    }
  }
  return methods;
}

export interface Spec {
  paths: Record<string, Record<string, Operation>>;
  components: { schemas: Record<string, { examples?: unknown[] }> };
}

export interface Operation {
  operationId: string;
  tags?: string[];
  parameters?: { name?: string; in?: string; $ref?: string }[];
  requestBody?: {
    content?: Record<string, { examples?: Record<string, { value: unknown }>; schema?: { $ref?: string } }>;
  };
  'x-codeSamples'?: CodeSample[];
}

function exampleBody(op: Operation, spec: Spec, mediaType = 'application/json'): unknown {
  const json = op.requestBody?.content?.[mediaType];
  if (!json) return undefined;
  const first = json.examples ? Object.values(json.examples)[0]?.value : undefined;
  if (first) return first;
  const ref = json.schema?.$ref?.split('/').pop();
  const schema = ref ? spec.components.schemas[ref] : undefined;
  return schema?.examples?.[0] ?? {};
}

function sampleFor(path: string, op: Operation, spec: Spec, sdk: SdkMethod, upload?: SdkMethod): string {
  const pathArgs = [...path.matchAll(/\{(\w+)\}/g)].map((m) => `'${exampleId(m[1]!)}'`);
  const body = exampleBody(op, spec);
  const args = [...pathArgs, ...(body === undefined ? [] : [JSON.stringify(body, null, 2)])].join(', ');
  let printed = sdk.iterable
    ? `for await (const item of ${sdk.call}(${args})) console.log(item);`
    : `const result = await ${sdk.call}(${args});\nconsole.log(result);`;
  if (upload) {
    // The SDK sends multipart bodies through its own method; `file` takes a path, bytes, a Blob or a stream.
    const fields = { ...(exampleBody(op, spec, 'multipart/form-data') as object), file: 'train.jsonl' };
    const uploaded = `const uploaded = await ${upload.call}(${JSON.stringify(fields, null, 2)});\nconsole.log(uploaded);`;
    printed = `// multipart/form-data: a JSONL file\n${uploaded}\n\n// application/json\n${printed}`;
  }
  return `import { Tunery } from '@tunery/sdk';\n\nconst tunery = new Tunery(); // TUNERY_BASE_URL, TUNERY_API_KEY\n${printed}\n`;
}

function exampleId(param: string): string {
  const examples: Record<string, string> = {
    job_id: 'job_4f0c2a9d1b7e4c55a0d3e8f1',
    dataset_id: 'ds_0123456789abcdef01234567',
    trajectory_id: 'traj_0123456789abcdef0123456',
    model_id: 'model_0123456789abcdef012345',
    adapter_name: 'coding_assistant_v1',
    template_name: 'lora-default',
    file: 'adapter_model.safetensors',
  };
  return examples[param] ?? param;
}

/** The official `openai` client's call for each OpenAI-compatible operation (tag OpenAI). */
const OPENAI_CLIENT_CALLS: Record<string, string> = {
  createOpenAIFile: "client.files.create({ file: createReadStream('train.jsonl'), purpose: 'fine-tune' })",
  listOpenAIFiles: 'client.files.list()',
  getOpenAIFile: "client.files.retrieve('ds_0123456789abcdef01234567')",
  deleteOpenAIFile: "client.files.delete('ds_0123456789abcdef01234567')",
  getOpenAIFileContent: "(await client.files.content('ds_0123456789abcdef01234567')).text()",
  createOpenAIFineTuningJob:
    "client.fineTuning.jobs.create({ model: 'tiny-llama', training_file: 'ds_0123456789abcdef01234567' })",
  listOpenAIFineTuningJobs: 'client.fineTuning.jobs.list()',
  getOpenAIFineTuningJob: "client.fineTuning.jobs.retrieve('job_4f0c2a9d1b7e4c55a0d3e8f1')",
  cancelOpenAIFineTuningJob: "client.fineTuning.jobs.cancel('job_4f0c2a9d1b7e4c55a0d3e8f1')",
  pauseOpenAIFineTuningJob: "client.fineTuning.jobs.pause('job_4f0c2a9d1b7e4c55a0d3e8f1')",
  resumeOpenAIFineTuningJob: "client.fineTuning.jobs.resume('job_4f0c2a9d1b7e4c55a0d3e8f1')",
  listOpenAIFineTuningEvents: "client.fineTuning.jobs.listEvents('job_4f0c2a9d1b7e4c55a0d3e8f1')",
  listOpenAIFineTuningCheckpoints: "client.fineTuning.jobs.checkpoints.list('job_4f0c2a9d1b7e4c55a0d3e8f1')",
  createOpenAIChatCompletion:
    "client.chat.completions.create({ model: 'model_0123456789abcdef012345', messages: [{ role: 'user', content: 'Say hi' }] })",
  createOpenAICompletion:
    "client.completions.create({ model: 'smollm2-135m-instruct', prompt: 'Once upon a time' })",
  listOpenAIModels: 'client.models.list()',
  getOpenAIModel: "client.models.retrieve('tiny-llama')",
};

function openAIClientSample(call: string): string {
  const printed = /\.list(Events)?\(/.test(call)
    ? `for await (const item of ${call}) console.log(item);`
    : `console.log(await ${call});`;
  const fs = call.includes('createReadStream') ? "import { createReadStream } from 'node:fs';\n" : '';
  return `${fs}import OpenAI from 'openai';\n\nconst client = new OpenAI({\n  baseURL: \`\${process.env.TUNERY_BASE_URL}/openai/v1\`,\n  apiKey: process.env.TUNERY_API_KEY,\n});\n${printed}\n`;
}

function curlFor(
  method: string,
  path: string,
  op: Operation,
  spec: Spec,
  token = 'TUNERY_WORKER_TOKEN',
): string {
  const body = exampleBody(op, spec);
  const url = `$TUNERY_BASE_URL${path.replace(/\{(\w+)\}/g, (_, p: string) => exampleId(p))}`;
  const data =
    body === undefined ? '' : ` \\\n  -H 'Content-Type: application/json' -d '${JSON.stringify(body)}'`;
  return `curl -X ${method.toUpperCase()} "${url}" \\\n  -H "Authorization: Bearer $${token}"${data}`;
}

/** The sample tabs of the reference, in order; each x-codeSamples label set above must be one. */
export const SAMPLE_LANGUAGES = [
  { lang: 'TypeScript', label: '@tunery/sdk' },
  { lang: 'TypeScript', label: 'openai' },
  { lang: 'curl', label: 'curl' },
  { lang: 'Payload', label: 'Payload' },
];

/** Sets x-codeSamples on every operation of the parsed spec; throws when an operation gets none. */
export function addCodeSamples(spec: Spec, root: string): Spec {
  const sdk = sdkMethods(root);
  const missing: string[] = [];
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(item)) {
      if (!op || typeof op !== 'object' || !('operationId' in op)) continue;
      const sdkCall = sdk.get(`${method} ${path}`) ?? SAME_AS[`${method} ${path}`];
      const upload = op.requestBody?.content?.['multipart/form-data']
        ? sdk.get(`${method} ${path} multipart`)
        : undefined;
      if (sdkCall) {
        op['x-codeSamples'] = [
          {
            lang: 'TypeScript',
            label: '@tunery/sdk',
            source: sampleFor(path, op, spec, sdkCall, upload),
          },
        ];
      } else if (op.tags?.includes('OpenAI')) {
        // The OpenAI-compatible surface is for OpenAI's clients; curl where a sample is not written yet.
        const call = OPENAI_CLIENT_CALLS[op.operationId];
        op['x-codeSamples'] = [
          call
            ? { lang: 'TypeScript', label: 'openai', source: openAIClientSample(call) }
            : { lang: 'Shell', label: 'curl', source: curlFor(method, path, op, spec, 'TUNERY_API_KEY') },
        ];
      } else if (op.tags?.includes('workers')) {
        // The worker protocol is spoken by tunery-worker, not the SDK.
        op['x-codeSamples'] = [{ lang: 'Shell', label: 'curl', source: curlFor(method, path, op, spec) }];
      } else {
        missing.push(op.operationId);
      }
    }
  }
  if (missing.length) throw new Error(`No SDK method found for: ${missing.join(', ')}`);
  const shown = new Set(SAMPLE_LANGUAGES.map((l) => l.label));
  const hidden = operations(spec).flatMap((op) => op['x-codeSamples']!.filter((s) => !shown.has(s.label)));
  if (hidden.length) throw new Error(`Redoc would hide samples labelled: ${hidden.map((s) => s.label)}`);
  return spec;
}

export function operations(spec: Spec): Operation[] {
  return Object.values(spec.paths).flatMap((item) =>
    Object.values(item).filter((op) => op && typeof op === 'object' && 'operationId' in op),
  );
}
