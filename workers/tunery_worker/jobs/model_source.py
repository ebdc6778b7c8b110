"""What a job starts from: a `model` input, or the spec's `base_model.source`, plus an optional adapter.

A `model` input is files the server sent for this job (an output model of the job's own tenant, named
by id). A source in the spec is the tenant's words: a hub id, or a path, which is loaded only when its
real path (symlinks resolved) lies inside a folder the operator allows in `TUNERY_MODEL_ROOTS`
(colon-separated; unset allows no path), so a tenant cannot read any other folder of the worker host.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunery_worker.context import JobContext
from tunery_worker.errors import InvalidConfig
from tunery_worker.modeling import load_dtype, load_model_and_tokenizer, load_tokenizer


def model_source(ctx: JobContext) -> str:
    """The `model` input directory when the job has one (a Tunery output model), else `base_model.source`."""
    if "model" in ctx.inputs:
        return str(ctx.inputs["model"])
    base = ctx.spec.get("base_model") or {}
    source = base.get("source") if isinstance(base, dict) else None
    if not source:
        raise InvalidConfig(
            "no model to start from: give a `model` input or base_model.source", param="base_model"
        )
    source = checked_source(str(source))
    if _looks_like_path(source) and not (Path(source) / "config.json").is_file():
        # A hub id would be fetched; a path that is not a model directory can never load.
        raise InvalidConfig(
            f"base_model.source {source!r} is not a model directory", param="base_model.source"
        )
    return str(source)


def load_source_model(
    ctx: JobContext, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The job's model, in `dtype` (default: 16-bit on CUDA, fp32 on CPU; see `load_dtype`).

    With an `adapter` input (the job starts from an adapter model), its base with the adapter merged
    in: the weights the adapter's own outputs came from. The spec's `hf_token` reaches the hub.
    """
    dtype = dtype or load_dtype(ctx.device)
    token = ctx.spec.get("hf_token")  # read here only: the secret never enters a saved config
    if "adapter" not in ctx.inputs:
        return load_model_and_tokenizer(model_source(ctx), device=ctx.device, dtype=dtype, token=token)
    adapter_dir = Path(ctx.inputs["adapter"])
    base, tokenizer = load_model_and_tokenizer(
        base_for_adapter(ctx, adapter_dir), device=ctx.device, dtype=dtype, token=token
    )
    if (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(adapter_dir)  # the adapter's job may have added tokens
    return merge_adapter(base, adapter_dir), tokenizer


def merge_adapter(base: PreTrainedModel, adapter_dir: Path) -> PreTrainedModel:
    """`base` with the LoRA adapter in `adapter_dir` merged into its weights."""
    from peft import PeftModel  # imported here: most jobs never start from an adapter

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()  # type: ignore[no-any-return]


#: Adapter settings that `stack_adapters` cannot carry over (each changes what the factors compute).
_UNSTACKABLE = ("use_rslora", "use_dora", "modules_to_save", "rank_pattern", "alpha_pattern")


def stack_adapters(below: Path, above: Path) -> None:
    """Rewrites the adapter in `above`, trained over `below` merged into the base, as one adapter
    over the base itself, so it serves and merges like any other.

    LoRA adds `alpha/r · B·A` to a weight. Two adapters side by side (A's rows stacked, B's columns,
    each B scaled by its own alpha/r) are one adapter of rank r₁ + r₂ with scale 1 whose update is the
    sum of theirs. A module only one of them adapts gets zero factors from the other.
    """
    from safetensors.torch import load_file, save_file

    configs = [json.loads((d / "adapter_config.json").read_text()) for d in (below, above)]
    for config in configs:
        check_stackable(config)
    factors = [
        _scaled_factors(load_file(d / "adapter_model.safetensors"), c)
        for d, c in zip((below, above), configs, strict=True)
    ]
    ranks = [int(c["r"]) for c in configs]
    slots = sorted(factors[0].keys() | factors[1].keys())
    stacked: dict[str, torch.Tensor] = {}
    for slot in slots:
        module, (a_name, b_name) = slot
        a_any, b_any = next(f[slot] for f in factors if slot in f)
        a_parts, b_parts = [], []
        for found, rank in zip(factors, ranks, strict=True):
            a, b = found.get(slot) or (
                a_any.new_zeros(rank, a_any.shape[1]),
                b_any.new_zeros(b_any.shape[0], rank),
            )
            a_parts.append(a.to(a_any.dtype))
            b_parts.append(b.to(b_any.dtype))
        stacked[f"{module}.{a_name}"] = torch.cat(a_parts, dim=0).contiguous()
        stacked[f"{module}.{b_name}"] = torch.cat(b_parts, dim=1).contiguous()
    save_file(stacked, str(above / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = configs[1]
    if configs[0].get("target_modules") != config.get("target_modules"):
        config["target_modules"] = sorted({module.rsplit(".", 1)[-1] for module, _ in slots})
    config.update(r=sum(ranks), lora_alpha=sum(ranks))
    (above / "adapter_config.json").write_text(json.dumps(config, indent=2))


def check_stackable(config: dict[str, Any]) -> None:
    """Refuses an adapter config whose adapter `stack_adapters` could not stack (InvalidConfig)."""
    kept = [key for key in _UNSTACKABLE if config.get(key)]
    if kept or config.get("bias", "none") != "none":
        raise InvalidConfig(
            f"cannot train on top of an adapter that uses {', '.join(kept) or 'bias'}",
            param="source_model_id",
        )


#: The names of a saved LoRA module's two factors: linear layers' (A [r, in], B [out, r]) and
#: embeddings' (A [r, vocab], B [dim, r]); both stack the same way.
_FACTOR_NAMES = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))


def _scaled_factors(
    weights: dict[str, torch.Tensor], config: dict[str, Any]
) -> dict[tuple[str, tuple[str, str]], tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted module's (A, alpha/r · B), by the module's name and its factors' names.

    peft also saves a copy of an adapted embedding's own weights (`….base_layer.weight`): here that
    is the base with the start adapter merged in, which the stacked adapter must not carry (loaded
    over the base, it would add the start adapter twice), so it is left out. Any other tensor is
    refused rather than dropped.
    """
    scale = float(config["lora_alpha"]) / float(config["r"])
    found: dict[tuple[str, tuple[str, str]], tuple[torch.Tensor, torch.Tensor]] = {}
    for key, tensor in weights.items():
        names = next((n for n in _FACTOR_NAMES if key.endswith("." + n[0])), None)
        if names is not None:
            module = key[: -len(names[0]) - 1]
            found[(module, names)] = (tensor, weights[f"{module}.{names[1]}"] * scale)
        elif not key.endswith((".base_layer.weight", *(f".{n[1]}" for n in _FACTOR_NAMES))):
            raise InvalidConfig(f"cannot stack an adapter that saves {key}", param="source_model_id")
    return found


def base_for_adapter(ctx: JobContext, adapter_dir: Path) -> str:
    """The base an adapter applies to: `base_model.source`, else the path the adapter recorded."""
    base = ctx.spec.get("base_model") or {}
    if isinstance(base, dict) and base.get("source"):
        return checked_source(str(base["source"]))
    config_path = adapter_dir / "adapter_config.json"
    if config_path.is_file():
        recorded = json.loads(config_path.read_text()).get("base_model_name_or_path")
        if recorded:
            return checked_source(str(recorded), param="adapter")
    raise InvalidConfig("an adapter input needs base_model.source to name its base model", param="base_model")


MODEL_ROOTS_ENV = "TUNERY_MODEL_ROOTS"


def model_roots() -> list[str]:
    """The operator's model folders, as real paths (relative entries are ignored)."""
    entries = os.environ.get(MODEL_ROOTS_ENV, "").split(":")
    return [os.path.realpath(entry) for entry in entries if os.path.isabs(entry)]


def checked_source(source: str, param: str = "base_model.source") -> str:
    """A hub id as is; a path as its real path, when that lies inside a model root (`InvalidConfig` if not).

    Checked where the model is loaded, after resolving symlinks: the server can only check the path's
    text, and a link inside a root may point anywhere.
    """
    if not _looks_like_path(source):
        return source
    real = os.path.realpath(os.path.expanduser(source))
    if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in model_roots()):
        raise InvalidConfig(
            f"model path {source!r} is not inside a folder this worker loads models from ({MODEL_ROOTS_ENV})",
            param=param,
        )
    return real


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).exists()
