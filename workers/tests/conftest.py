"""Shared fixtures: tiny models built once per session (random weights, tokenizer trained on the spot)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunery_worker.tiny_model import make_tiny_model

# One thread: CPU kernels then reduce in a fixed order, so runs are bit-for-bit repeatable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2", seed=0)
