#!/usr/bin/env bash
# Installs everything a fresh clone needs: pnpm (pinned), the JS workspace, the worker's virtualenv.
# Idempotent: safe to run before every demo or test run.
set -euo pipefail
cd "$(dirname "$0")/.."
PNPM_VERSION=12.4.2
if ! command -v pnpm >/dev/null 2>&1 || [ "$(pnpm --version)" != "$PNPM_VERSION" ]; then
  npm install --global --silent "pnpm@$PNPM_VERSION"
fi
pnpm install --frozen-lockfile --reporter=silent
bash scripts/setup-venv.sh
