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
# Headless Chromium checks the generated docs. Installed where we may (root with apt); the docs
# browser test is skipped, saying so, where it is missing.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "note: could not install chromium; the docs browser test will be skipped" >&2
fi
