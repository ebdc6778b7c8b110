#!/usr/bin/env bash
# The whole test suite, in the order failures are cheapest to find. `pnpm test` runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
export TUNERY_TEST_DATABASE_URL="${TUNERY_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

section() { printf '\n=== %s ===\n' "$1"; }

section "spec lint (redocly, strict)"
pnpm --silent run lint:spec

section "generated types are fresh"
bash scripts/check-generated.sh

section "TypeScript lint"
pnpm -s exec biome check .

section "Python lint"
.venv/bin/ruff check workers
.venv/bin/ruff format --check workers
(cd workers && ../.venv/bin/mypy tunery_worker)

section "docs (API reference + SDK reference)"
bash scripts/docs.sh

section "JS/TS packages (vitest)"
pnpm -r --filter '!@tunery/e2e' --filter '!@tunery/drills' --workspace-concurrency=1 --reporter-hide-prefix test

section "schemathesis (live server, every operation)"
bash scripts/schemathesis.sh

section "end-to-end (server + worker + SDK)"
pnpm -C e2e test

section "worker (pytest)"
.venv/bin/python -m pytest workers -q -p no:cacheprovider

section "fault drills"
pnpm -C drills test
