import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';

const openapiDir = resolve(import.meta.dirname, '..');
const seedsDir = process.env.TUNERY_SEEDS_DIR ?? resolve(openapiDir, '../../shared/seeds');

interface CoverageRow {
  seed: string;
  endpoint: string;
  operationId: string;
}

function coverageRows(): CoverageRow[] {
  const text = readFileSync(join(openapiDir, 'COVERAGE.md'), 'utf8');
  const rows: CoverageRow[] = [];
  for (const line of text.split('\n')) {
    const match = /^\|\s*(\d{3})\s*\|\s*`([A-Z]+ [^`]+)`\s*\|\s*(\w+)\s*\|/.exec(line);
    if (match) rows.push({ seed: match[1]!, endpoint: match[2]!, operationId: match[3]! });
  }
  return rows;
}

function specOperationIds(): Set<string> {
  const spec = parse(readFileSync(join(openapiDir, 'openapi.yaml'), 'utf8')) as {
    paths: Record<string, Record<string, { operationId?: string }>>;
  };
  const ids = new Set<string>();
  for (const item of Object.values(spec.paths)) {
    for (const operation of Object.values(item)) {
      if (operation && typeof operation === 'object' && operation.operationId) ids.add(operation.operationId);
    }
  }
  return ids;
}

/** Endpoints a seed names in its prose, headings and tables (code blocks hold examples, not endpoints). */
function seedEndpoints(text: string): Set<string> {
  const endpoints = new Set<string>();
  let inFence = false;
  for (const line of text.split('\n')) {
    if (line.trimStart().startsWith('```')) {
      inFence = !inFence;
      continue;
    }
    if (inFence) continue;
    for (const match of line.matchAll(/\b(GET|POST|PUT|PATCH|DELETE)\s*\|?\s*`?(\/[^\s`|?)]*)/g)) {
      endpoints.add(`${match[1]} ${match[2]!.replace(/[.,;:]+$/, '')}`);
    }
  }
  return endpoints;
}

describe('openapi/COVERAGE.md', () => {
  const rows = coverageRows();

  it('has rows', () => {
    expect(rows.length).toBeGreaterThan(40);
  });

  it('names only operationIds that exist in the spec', () => {
    const ids = specOperationIds();
    const missing = rows.filter((row) => !ids.has(row.operationId)).map((row) => row.operationId);
    expect(missing).toEqual([]);
  });

  const seedFiles = existsSync(seedsDir) ? readdirSync(seedsDir).filter((f) => f.endsWith('.txt')) : [];
  it.skipIf(seedFiles.length === 0)('has a row for every endpoint of every seed', () => {
    const missing: string[] = [];
    for (const file of seedFiles) {
      const seed = file.slice(0, 3);
      const covered = new Set(rows.filter((row) => row.seed === seed).map((row) => row.endpoint));
      for (const endpoint of seedEndpoints(readFileSync(join(seedsDir, file), 'utf8'))) {
        if (!covered.has(endpoint)) missing.push(`${seed} ${endpoint}`);
      }
    }
    expect(missing).toEqual([]);
  });
});

describe('seedEndpoints', () => {
  it('finds headings, tables and prose, and skips code blocks', () => {
    const text = [
      '## POST /v1/distillation',
      '| GET    | `/api/training/jobs/{id}` | Job status |',
      '**Endpoint:** `POST /training/start`',
      'Submit a run — POST /jobs',
      'GET /jobs/{id}/metrics?since_step=N',
      '```http',
      'GET /v1/distillation/job_abc123?tenant_id=default HTTP/1.1',
      '```',
    ].join('\n');
    expect([...seedEndpoints(text)].sort()).toEqual([
      'GET /api/training/jobs/{id}',
      'GET /jobs/{id}/metrics',
      'POST /jobs',
      'POST /training/start',
      'POST /v1/distillation',
    ]);
  });
});
