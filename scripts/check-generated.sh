#!/usr/bin/env bash
# Fails when a committed generated file differs from what openapi-typescript makes of the spec now.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for target in packages/sdk/src/generated/api.ts server/src/generated/api.ts; do
  pnpm -s exec openapi-typescript openapi/openapi.yaml -o "$tmp/api.ts" >/dev/null 2>&1
  if ! diff -q "$tmp/api.ts" "$target" >/dev/null; then
    echo "stale generated file: $target (run 'pnpm generate')" >&2
    status=1
  fi
done
[ $status -eq 0 ] && echo "generated types: up to date"
exit $status
