#!/usr/bin/env bash
# Creates the worker's virtualenv at .venv (ignored by git) and installs tunery-worker into it.
# torch is pinned first to the CPU build this project's machines carry; a GPU host may pre-install
# its own CUDA torch into .venv before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e "workers[dev]"
echo "worker venv ready: $(.venv/bin/python -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)')"
