"""Tiny models: loadable like hub checkpoints, deterministic per seed, with a working chat template."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from tunery_worker.modeling import count_params, load_model_and_tokenizer, perplexity
from tunery_worker.tiny_model import make_tiny_model


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_files_other_seed_other_weights(tmp_path: Path, tiny_llama: Path) -> None:
    again = make_tiny_model(tmp_path / "again", arch="llama", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(again / name) == digest(tiny_llama / name), name
    other = make_tiny_model(tmp_path / "other", arch="llama", seed=1)
    assert digest(other / "model.safetensors") != digest(tiny_llama / "model.safetensors")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loads_and_scores_offline(request: pytest.FixtureRequest, arch: str) -> None:
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    model, tokenizer = load_model_and_tokenizer(model_dir, device="cpu")
    assert model.config.model_type == arch and model.config.num_hidden_layers == 2
    assert len(tokenizer) == model.config.vocab_size <= 512
    assert 50_000 < count_params(model) < 500_000
    # A random model is close to uniform over the vocabulary, far from a trained one.
    ppl = perplexity(model, tokenizer, ["The quick brown fox.", "Hello world!"], max_len=32)
    assert 50 < ppl < 50_000


def test_tokenizer_round_trips_any_text_and_renders_chat(tiny_llama: Path) -> None:
    _, tokenizer = load_model_and_tokenizer(tiny_llama, device="cpu")
    text = "Ünïcödé ✓ and emoji 🚀 in a sentence"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_unknown_arch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        make_tiny_model(tmp_path, arch="gpt2")  # type: ignore[arg-type]


def test_cuda_device_is_refused_without_a_gpu(tiny_llama: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from tunery_worker.modeling import resolve_device

    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
