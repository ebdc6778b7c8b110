/**
 * Builds docs-site/: the API reference from openapi/ (Redoc, inlined so it works offline) with one
 * @tunery/sdk code sample per operation, and the SDK reference (typedoc). The server serves the
 * folder at /docs. Samples are derived from the SDK's own resource classes, so a renamed method
 * shows up here without anyone editing the docs.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parse } from 'yaml';

const root = resolve(import.meta.dirname, '..');
const out = join(root, 'docs-site');
const resourcesDir = join(root, 'packages/sdk/src/resources');

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
const SAME_AS: Record<string, string> = {
  'delete /v1/training/jobs/{job_id}': 'tunery.training.jobs.cancel',
};

function sourceFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const full = join(dir, name);
    return statSync(full).isDirectory() ? sourceFiles(full) : full.endsWith('.ts') ? [full] : [];
  });
}

/** `post /v1/training/jobs` → `tunery.training.jobs.create`, read from the SDK's source. */
function sdkMethods(): Map<string, string> {
  const methods = new Map<string, string>();
  const files = [join(root, 'packages/sdk/src/client.ts'), ...sourceFiles(resourcesDir)];
  for (const file of files) {
    let className = '';
    let methodName = '';
    for (const line of readFileSync(file, 'utf8').split('\n')) {
      const cls = /^export class (\w+)/.exec(line);
      if (cls) className = cls[1]!;
      const method = /^ {2}(?:async )?(\w+)\(/.exec(line);
      if (method) methodName = method[1]!;
      const call =
        /(?:this\._client|this)\.(get|post|put|delete|patch|getList|getStream)\('(\/v1[^']*)'/.exec(line);
      if (call && className in ACCESSORS) {
        const verb = call[1]!.replace(/^get(List|Stream)$/, 'get');
        const key = `${verb} ${call[2]}`;
        if (!methods.has(key)) methods.set(key, `${ACCESSORS[className]}.${methodName}`);
      }
    }
  }
  return methods;
}

interface Spec {
  paths: Record<string, Record<string, Operation>>;
  components: { schemas: Record<string, { examples?: unknown[] }> };
}

interface Operation {
  operationId: string;
  tags?: string[];
  parameters?: { name?: string; in?: string; $ref?: string }[];
  requestBody?: {
    content?: Record<string, { examples?: Record<string, { value: unknown }>; schema?: { $ref?: string } }>;
  };
  'x-codeSamples'?: unknown[];
}

function exampleBody(op: Operation, spec: Spec): unknown {
  const json = op.requestBody?.content?.['application/json'];
  if (!json) return undefined;
  const first = json.examples ? Object.values(json.examples)[0]?.value : undefined;
  if (first) return first;
  const ref = json.schema?.$ref?.split('/').pop();
  const schema = ref ? spec.components.schemas[ref] : undefined;
  return schema?.examples?.[0] ?? {};
}

function sampleFor(method: string, path: string, op: Operation, spec: Spec, sdk: string): string {
  const pathArgs = [...path.matchAll(/\{(\w+)\}/g)].map((m) => `'${exampleId(m[1]!)}'`);
  const body = exampleBody(op, spec);
  const args = [...pathArgs, ...(body === undefined ? [] : [JSON.stringify(body, null, 2)])].join(', ');
  const call = `await ${sdk}(${args})`;
  const printed =
    method === 'get' && /list|List|^stream/.test(op.operationId)
      ? `for await (const item of ${sdk}(${args})) console.log(item);`
      : `const result = ${call};\nconsole.log(result);`;
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

/** The sample tabs of the reference; `label` must match the x-codeSamples labels set below. */
const SAMPLE_LANGUAGES = [
  { lang: 'TypeScript', label: '@tunery/sdk' },
  { lang: 'TypeScript', label: 'openai' },
  { lang: 'curl', label: 'curl' },
  { lang: 'Payload', label: 'Payload' },
];

function buildReference(): void {
  const spec = parse(readFileSync(join(root, 'openapi/openapi.yaml'), 'utf8')) as Spec;
  const sdk = sdkMethods();
  const missing: string[] = [];
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(item)) {
      if (!op || typeof op !== 'object' || !('operationId' in op)) continue;
      const sdkCall = sdk.get(`${method} ${path}`) ?? SAME_AS[`${method} ${path}`];
      if (sdkCall) {
        op['x-codeSamples'] = [
          { lang: 'TypeScript', label: '@tunery/sdk', source: sampleFor(method, path, op, spec, sdkCall) },
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
  const hidden = Object.values(spec.paths)
    .flatMap((item) => Object.values(item))
    .flatMap((op) => (op['x-codeSamples'] ?? []) as { label: string }[])
    .filter((sample) => !shown.has(sample.label));
  if (hidden.length) throw new Error(`Redoc would hide samples labelled: ${hidden.map((s) => s.label)}`);
  mkdirSync(join(out, 'api'), { recursive: true });
  const bundled = join(out, 'openapi.json');
  writeFileSync(bundled, JSON.stringify(spec, null, 2));
  execFileSync(
    'pnpm',
    [
      'exec',
      'redocly',
      'build-docs',
      bundled,
      '--inlineBundle',
      '--title',
      'Tunery API',
      // Redoc 3 shows only the x-codeSamples whose label is one of these languages (its default list
      // knows curl but not our labels), in this order; the first one present is the open tab.
      '--openapi',
      JSON.stringify({ codeSamples: { languages: SAMPLE_LANGUAGES } }),
      '-o',
      join(out, 'api/index.html'),
    ],
    // REDOCLY_TELEMETRY=off also turns telemetry off in the page, which must work offline.
    { cwd: root, stdio: ['ignore', 'ignore', 'inherit'], env: { ...process.env, REDOCLY_TELEMETRY: 'off' } },
  );
}

function buildSdkReference(): void {
  execFileSync('pnpm', ['-C', 'packages/sdk', 'exec', 'typedoc', '--logLevel', 'Warn'], {
    cwd: root,
    stdio: 'inherit',
  });
}

function writeLanding(): void {
  writeFileSync(
    join(out, 'index.html'),
    `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Tunery docs</title>
<style>body{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;line-height:1.5}</style></head>
<body><h1>Tunery docs</h1><ul>
<li><a href="api/">API reference</a> — every operation, generated from openapi/openapi.yaml, with @tunery/sdk samples</li>
<li><a href="sdk/">SDK reference</a> — @tunery/sdk, generated by typedoc</li>
<li><a href="openapi.json">openapi.json</a> — the spec with its code samples</li>
</ul></body></html>\n`,
  );
}

mkdirSync(out, { recursive: true });
buildReference();
buildSdkReference();
writeLanding();
console.log(`docs built in ${out}`);
