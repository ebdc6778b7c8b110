"""Shared fixtures: tiny models built once per session (random weights, tokenizer trained on the spot)."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="session", autouse=True)
def egress_opt_in(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests load models from their temp dirs and call teachers on 127.0.0.1: both are refused by
    default (TUNERY_MODEL_ROOTS unset, teachers at public addresses only), so the suite opts in as an
    operator would. test_egress.py checks the defaults with these unset."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNERY_MODEL_ROOTS", os.path.realpath(tmp_path_factory.getbasetemp()))
        patch.setenv("TUNERY_TEACHER_ALLOWED_HOSTS", "127.0.0.1")
        yield
