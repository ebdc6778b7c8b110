#!/usr/bin/env bash
# Builds docs-site/ (API reference + SDK reference). The server serves it at /docs.
set -euo pipefail
cd "$(dirname "$0")/.."
pnpm -s exec tsx scripts/build-docs.ts
