// Requests the server makes, or has a worker make, for a tenant (SSRF): teacher URLs, Ollama
// imports, and model paths on the workers.
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { completedJob } from './fixtures.js';
import { DATABASES, startTestServer, type TestServer } from './harness.js';

interface Stub {
  url: string;
  port: number;
  /** `METHOD path` of every request received. */
  requests: string[];
  close(): Promise<void>;
}

/** An HTTP server on 127.0.0.1 answering with `handler`, recording what it was asked. */
async function stub(handler: (req: IncomingMessage, res: ServerResponse) => void): Promise<Stub> {
  const requests: string[] = [];
  const server = createServer((req, res) => {
    requests.push(`${req.method} ${req.url}`);
    req.resume();
    req.on('end', () => handler(req, res));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    requests,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/** A port nothing listens on. */
async function closedPort(): Promise<number> {
  const s = await stub(() => {});
  await s.close();
  return s.port;
}

describe.each(DATABASES)('security: egress on %s', (db) => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer(db);
  });
  afterAll(async () => {
    await server?.stop();
  });

  /** Runs `fn` with the server's model roots set to `roots` (TUNERY_MODEL_ROOTS). */
  async function withRoots(roots: string[], fn: () => Promise<void>) {
    const before = server.ctx.config.modelRoots;
    server.ctx.config.modelRoots = roots;
    try {
      await fn();
    } finally {
      server.ctx.config.modelRoots = before;
    }
  }

  const train = (base_model: string, key?: string) =>
    server.api('/v1/training/jobs', { method: 'POST', json: { base_model, train_texts: ['a'] }, key });
  const distill = (config: Record<string, unknown>) =>
    server.api('/v1/distillation', {
      method: 'POST',
      json: { name: 'sec', config: { student_model: 'smollm2-135m-instruct', prompts: ['hi'], ...config } },
    });
  const errorOf = async (res: Response) => ((await res.json()) as { error: Record<string, unknown> }).error;

  describe('teacher URLs', () => {
    it('refuses teacher URLs with credentials, other schemes, or on a local teacher', async () => {
      for (const url of [
        'https://user:secret@api.example.com/v1',
        'https://sk-live-key@api.example.com/v1',
        'ftp://api.example.com/v1',
        'file:///etc/passwd',
      ]) {
        const res = await distill({ teacher_model: 'openai/gpt-4o', teacher_base_url: url });
        expect(res.status, url).toBe(400);
        expect(await errorOf(res)).toMatchObject({
          code: 'invalid_config',
          param: 'config.teacher_base_url',
        });
      }
      const local = await distill({
        teacher_model: 'local/smollm2-135m-instruct',
        teacher_base_url: 'https://api.example.com/v1',
      });
      expect(local.status).toBe(400);
      expect(await errorOf(local)).toMatchObject({ param: 'config.teacher_base_url' });
      const fine = await distill({
        teacher_model: 'openai/gpt-4o',
        teacher_base_url: 'https://api.example.com/v1',
      });
      expect(fine.status).toBe(201);
    });
  });

  describe('Ollama import', () => {
    const gguf = (tenantId = 'default') =>
      completedJob(server, {
        tenantId,
        type: 'merge',
        method: null,
        config: { output_name: 'shared' },
        files: { 'model-q8_0.gguf': `GGUF of ${tenantId}` },
      });
    const importInto = (modelId: string, url: string, extra: Record<string, unknown> = {}, key?: string) =>
      server.api(`/v1/models/${modelId}/import-ollama`, {
        method: 'POST',
        json: { ollama_url: url, ...extra },
        key,
      });

    it('answers one fixed error whatever answered, so ports cannot be mapped through it', async () => {
      const { modelId } = await gguf();
      const leaky = await stub((_req, res) => {
        res.writeHead(500, { 'content-type': 'application/json' }).end('{"error":"SECRET internal state"}');
      });
      const other = await stub((_req, res) => res.writeHead(404).end('not ollama'));
      const closed = await closedPort();
      try {
        const errors = [];
        for (const url of [leaky.url, other.url, `http://127.0.0.1:${closed}`]) {
          const res = await importInto(modelId!, url);
          expect(res.status).toBe(502);
          errors.push(await errorOf(res));
        }
        expect(errors[0]).toMatchObject({ code: 'ollama_unreachable', param: 'ollama_url' });
        expect(errors[1]).toEqual(errors[0]);
        expect(errors[2]).toEqual(errors[0]);
        const text = JSON.stringify(errors[0]);
        for (const leak of ['SECRET', 'ECONNREFUSED', 'not ollama', '500', '404', String(closed)]) {
          expect(text).not.toContain(leak);
        }
      } finally {
        await leaky.close();
        await other.close();
      }
    });

    it('does not follow redirects', async () => {
      const { modelId } = await gguf();
      const elsewhere = await stub((_req, res) => {
        res.writeHead(200, { 'content-type': 'application/json' }).end('{"status":"success"}');
      });
      const redirecting = await stub((req, res) => {
        if (req.method === 'HEAD') return res.writeHead(200).end(); // "the blob is there"
        res.writeHead(307, { location: `${elsewhere.url}/api/create` }).end();
      });
      try {
        const res = await importInto(modelId!, redirecting.url);
        expect(res.status).toBe(502);
        expect(redirecting.requests.at(-1)).toBe('POST /api/create');
        expect(elsewhere.requests).toEqual([]);
      } finally {
        await redirecting.close();
        await elsewhere.close();
      }
    });

    it("names models in the tenant's own namespace, so tenants cannot overwrite each other", async () => {
      const creates: string[] = [];
      const ollama = await stub((req, res) => {
        if (req.url === '/api/create') creates.push(req.method ?? '');
        res.writeHead(200, { 'content-type': 'application/json' }).end('{"status":"success"}');
      });
      try {
        const mine = await gguf('default');
        const theirs = await gguf('other-tenant');
        const a = await importInto(mine.modelId!, ollama.url, { model_name: 'support-bot' });
        const b = await importInto(
          theirs.modelId!,
          ollama.url,
          { model_name: 'support-bot' },
          server.otherKey,
        );
        expect(a.status).toBe(200);
        expect(b.status).toBe(200);
        expect((await a.json()).model.ollama_name).toBe('tunery-default/support-bot');
        expect((await b.json()).model.ollama_name).toBe('tunery-other-tenant/support-bot');
        expect(creates).toHaveLength(2);
      } finally {
        await ollama.close();
      }
    });

    it('refuses base_model instead of ignoring it', async () => {
      const { modelId } = await gguf();
      const res = await importInto(modelId!, `http://127.0.0.1:${await closedPort()}`, {
        base_model: 'llama3',
      });
      expect(res.status).toBe(400);
      expect(await errorOf(res)).toMatchObject({ code: 'invalid_request', param: 'base_model' });
    });
  });

  describe('model paths on the workers', () => {
    it('refuses absolute paths when the operator set no model roots', async () => {
      expect(server.ctx.config.modelRoots).toEqual([]);
      const res = await train('/home/worker/.cache/other-tenant-model');
      expect(res.status).toBe(400);
      const error = await errorOf(res);
      expect(error).toMatchObject({ code: 'invalid_config', param: 'base_model' });
      expect(error.message).toContain('TUNERY_MODEL_ROOTS');
      const catalog = await server.api('/v1/base-models', {
        method: 'POST',
        json: { name: 'sneaky', source: '/etc' },
      });
      expect(catalog.status).toBe(400);
      expect(await errorOf(catalog)).toMatchObject({ code: 'invalid_config', param: 'source' });
      const teacher = await distill({ teacher_model: 'local//srv/models/llama' });
      expect(await errorOf(teacher)).toMatchObject({ code: 'invalid_config', param: 'config.teacher_model' });
      const student = await distill({ teacher_model: 'openai/gpt-4o', student_model: '/srv/models/llama' });
      expect(await errorOf(student)).toMatchObject({ code: 'invalid_config', param: 'config.student_model' });
      // Hub ids and catalog names are what they always were.
      expect((await train('Qwen/Qwen2.5-0.5B-Instruct')).status).toBe(201);
      expect((await train('smollm2-135m-instruct')).status).toBe(201);
    });

    it('accepts paths only inside a model root, normalized, and never in the data directory', async () => {
      const root = dirname(server.dataDir); // holds the data dir too: it must stay off limits
      await withRoots([join(root, 'models'), root], async () => {
        expect((await train(join(root, 'models', 'llama'))).status).toBe(201);
        expect((await train(join(root, 'elsewhere', 'llama'))).status).toBe(201);
        for (const path of [
          `${root}/models/../../etc`,
          `${root}/models/./llama`,
          `${root}//models/llama`,
          '/etc/passwd',
          `${root}-evil/llama`,
          server.dataDir,
          join(server.dataDir, 'jobs', 'job_x', 'outputs'),
        ]) {
          const res = await train(path);
          expect(res.status, path).toBe(400);
          expect(await errorOf(res)).toMatchObject({ code: 'invalid_config', param: 'base_model' });
        }
      });
    });

    it('re-checks catalog entries against the current roots', async () => {
      await withRoots(['/srv/models'], async () => {
        const res = await server.api('/v1/base-models', {
          method: 'POST',
          json: { name: 'on-disk', source: '/srv/models/llama' },
        });
        expect(res.status).toBe(201);
        expect((await train('on-disk')).status).toBe(201);
      });
      // The operator narrowed the roots: the entry no longer resolves to a loadable path.
      await withRoots(['/srv/other'], async () => {
        const res = await train('on-disk');
        expect(res.status).toBe(400);
        expect(await errorOf(res)).toMatchObject({ code: 'invalid_config', param: 'base_model' });
      });
    });

    it("reaches another tenant's output model by no path and no id", async () => {
      const theirs = await completedJob(server, { tenantId: 'other-tenant', type: 'train', method: null });
      const res = await server.api('/v1/training/jobs', {
        method: 'POST',
        json: { source_model_id: theirs.modelId, train_texts: ['a'] },
      });
      expect(res.status).toBe(404);
      const byPath = await train(join(server.dataDir, 'jobs', theirs.jobId, 'outputs'));
      expect(byPath.status).toBe(400);
    });
  });
});
