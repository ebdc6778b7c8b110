#!/usr/bin/env bash
# Issue 14's CUDA checks in one run on a GPU machine (after `bash scripts/bootstrap.sh` and
# `.venv/bin/pip install -e 'workers[gpu]'` with a CUDA torch): the GPU tests (fused loss under
# autocast, bf16/fp16 LoRA, QLoRA with bitsandbytes, 2-GPU DDP when there are 2 cards), the GGUF
# export tests, then the speed comparison against hf_peft_baseline.py on the same card.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total --format=csv
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())'
(cd workers && ../$PY -m pytest tests -q -p no:cacheprovider -m gpu -rs)
(cd workers && ../$PY -m pytest tests/test_gguf_export.py -q -p no:cacheprovider)
(cd workers && ../$PY -m tunery_worker.bench --cuda --size 1b)
# torch.compile is opt-in: measure it too, to decide whether it should become the CUDA default.
(cd workers && TUNERY_TORCH_COMPILE=1 ../$PY -m tunery_worker.bench --cuda --size 1b)
