#!/usr/bin/env bash
# Fails when a committed generated file differs from what openapi-typescript makes of the spec now.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0

# check TARGET [openapi-typescript flags...]: regenerates with the same flags as TARGET's package's
# `generate` script and compares.
check() {
  local target=$1
  shift
  pnpm -s exec openapi-typescript openapi/openapi.yaml "$@" -o "$tmp/api.ts" >/dev/null 2>&1
  if ! diff -q "$tmp/api.ts" "$target" >/dev/null; then
    echo "stale generated file: $target (run 'pnpm generate')" >&2
    status=1
  fi
}

# The two targets are generated with different flags on purpose. The SDK passes
# --default-non-nullable false, so that properties with a spec `default` stay optional: callers may
# leave them out of requests, and stored configs echo back only what was sent. The server keeps
# openapi-typescript's default (defaulted properties required), since express-openapi-validator
# fills in defaults before handlers see a request body.
check packages/sdk/src/generated/api.ts --default-non-nullable false
check server/src/generated/api.ts

[ $status -eq 0 ] && echo "generated types: up to date"
exit $status
