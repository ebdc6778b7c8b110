#!/usr/bin/env bash
# Creates the worker's virtualenv at .venv (ignored by git) and installs tunery-worker into it.
# torch is pinned first to the CPU build this project's machines carry; a GPU host may pre-install
# its own CUDA torch into .venv before running this. Re-running is cheap: nothing is reinstalled
# while workers/pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

pip_install() {
  # Some machines list local package mirrors that do not exist; pip warns per package. Hide that noise.
  .venv/bin/python -m pip install --quiet "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  pip_install --upgrade pip
fi
marker=.venv/.tunery-installed
wanted=$(sha256sum workers/pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$marker" 2>/dev/null)" != "$wanted" ]; then
  if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    pip_install "torch==2.13.0"
  fi
  pip_install -e "workers[dev]"
  echo "$wanted" > "$marker"
fi
echo "worker venv ready: $(.venv/bin/python -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' 2>/dev/null)"
