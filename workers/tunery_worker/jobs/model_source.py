"""What a job starts from: a `model` input, or the spec's `base_model.source`, plus an optional adapter."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunery_worker.context import JobContext
from tunery_worker.errors import InvalidConfig
from tunery_worker.modeling import load_dtype, load_model_and_tokenizer


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
    if _looks_like_path(source) and not (Path(source) / "config.json").is_file():
        # A hub id would be fetched; a path that is not a model directory can never load.
        raise InvalidConfig(
            f"base_model.source {source!r} is not a model directory", param="base_model.source"
        )
    return str(source)


def load_source_model(
    ctx: JobContext, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The job's model, in `dtype` (default: 16-bit on CUDA, fp32 on CPU; see `load_dtype`)."""
    return load_model_and_tokenizer(
        model_source(ctx), device=ctx.device, dtype=dtype or load_dtype(ctx.device)
    )


def base_for_adapter(ctx: JobContext, adapter_dir: Path) -> str:
    """The base an adapter applies to: `base_model.source`, else the path the adapter recorded."""
    base = ctx.spec.get("base_model") or {}
    if isinstance(base, dict) and base.get("source"):
        return str(base["source"])
    config_path = adapter_dir / "adapter_config.json"
    if config_path.is_file():
        recorded = json.loads(config_path.read_text()).get("base_model_name_or_path")
        if recorded:
            return str(recorded)
    raise InvalidConfig("an adapter input needs base_model.source to name its base model", param="base_model")


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).exists()
