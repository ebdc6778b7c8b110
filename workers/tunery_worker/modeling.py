"""Loading models and tokenizers, and the measurements every job type reports (params, perplexity, memory)."""

from __future__ import annotations

import math
import os
import resource
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str = "auto") -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'; an explicit choice is checked, not overridden."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(DTYPES)}") from None


def bitsandbytes_available() -> bool:
    """QLoRA needs bitsandbytes and a CUDA device; importing it is the only reliable check."""
    if not torch.cuda.is_available():
        return False
    try:
        import bitsandbytes  # type: ignore[import-not-found]  # noqa: F401
    except Exception:  # a broken CUDA setup raises more than ImportError
        return False
    return True


def load_tokenizer(source: str | Path, token: str | None = None) -> PreTrainedTokenizerBase:
    local = Path(source).is_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=local, token=token)
    # Batching needs a pad token; reusing EOS is the usual choice for models that ship without one.
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    source: str | Path,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    quantize_4bit: bool = False,
    token: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM + tokenizer from a hub id or a local directory (which never touches the network).

    `token` is a hub access token for gated or private hub models (the spec's `hf_token`).
    """
    local = Path(source).is_dir()
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": local, "token": token}
    if quantize_4bit:
        if not str(device).startswith("cuda"):
            raise ValueError("4-bit quantization (QLoRA) needs a CUDA device")
        # Imported here: bitsandbytes is an optional GPU-only dependency.
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype if torch_dtype != torch.float32 else torch.bfloat16,
        )
        # Quantized weights are placed at load time; they cannot be moved with .to() afterwards.
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    if not quantize_4bit:
        # (Called through nn.Module: transformers' decorated `.to` confuses type checkers.)
        torch.nn.Module.to(model, torch.device(device))
    tokenizer = load_tokenizer(source, token=token)
    return model, tokenizer


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameter count; shared (tied) tensors count once, as `numel` of unique storage would."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        # bitsandbytes 4-bit params pack two values per byte; `quant_state.shape` has the logical size.
        quant_state = getattr(param, "quant_state", None)
        total += math.prod(quant_state.shape) if quant_state is not None else param.numel()
    return total


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many positions there were.

    Summing (not averaging) lets callers normalise over a whole accumulation window or eval set, so
    every token weighs the same however the tokens were split into batches.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, int((shift_labels != -100).sum())


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean loss over labelled batches (`input_ids`, `attention_mask`, `labels`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in batches:
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            loss, n = token_loss_sum(logits, batch["labels"].to(device))
            total += float(loss)
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no labelled tokens to evaluate")
    return total / count


def perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_len: int = 512,
    batch_size: int = 8,
) -> float:
    """exp(mean NLL per token) of `texts`, each truncated to `max_len` tokens, every token predicted."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = [
            tokenizer(text, truncation=True, max_length=max_len)["input_ids"]
            for text in texts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, : len(ids)] = torch.tensor(ids)
        batches.append({"input_ids": input_ids, "attention_mask": attention, "labels": labels})
    return math.exp(mean_token_loss(model, batches))


def memory_gb(device: str) -> dict[str, float]:
    """What to report as memory: peak VRAM on CUDA (`vram_gb`), else the process's resident set (`rss_gb`)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return {"vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    return {"rss_gb": round(_rss_bytes() / 2**30, 3)}


def _rss_bytes() -> int:
    try:
        # Current (not peak) resident set, in pages; Linux only.
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is bytes on macOS, kilobytes elsewhere.
        return peak if sys.platform == "darwin" else peak * 1024


def total_memory_gb(device: str) -> float:
    """Memory the worker announces: the GPU's total on CUDA, else the machine's RAM."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return 0.0
