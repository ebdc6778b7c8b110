"""Merging a LoRA adapter into its base model: the result is a plain model with the base's shapes.

Inputs: `adapter` (a directory with `adapter_model.safetensors` + `adapter_config.json`, usually a
finetune job's outputs) and the base from `base_model.source` (or a `model` input). The merge runs in
float32 so the merged weights equal base + scale·B·A without rounding; outputs are `model.safetensors`,
`config.json`, generation config and tokenizer files. With `export_gguf`, one `model-<q>.gguf` per
`quantization_types` entry joins them, written by the exporter distillation uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunery_worker.context import JobContext
from tunery_worker.errors import InvalidConfig
from tunery_worker.gguf_export import validate_quantization_types, write_gguf
from tunery_worker.jobs import spec_fields as f
from tunery_worker.jobs.model_source import model_source
from tunery_worker.modeling import count_params, load_dtype, load_model_and_tokenizer, load_tokenizer


def run(ctx: JobContext) -> dict[str, Any]:
    ctx.set_phase("initializing")
    adapter_dir, source = _resolve_inputs(ctx)
    output_name = str(ctx.spec.get("output_name") or f"{ctx.job_id}-merged")
    # Checked before loading anything: a bad type fails the job at once, not after the merge.
    gguf_types = (
        validate_quantization_types(f.get_str_list(ctx.spec, "quantization_types", ["q4_k_m"]))
        if f.get_bool(ctx.spec, "export_gguf", False)
        else []
    )

    ctx.set_phase("loading_model")
    from peft import PeftModel

    hf_token = ctx.spec.get("hf_token")
    # 16-bit on CUDA (bf16 where native): half the memory of fp32, and the dtype models ship in.
    base, tokenizer = load_model_and_tokenizer(
        source, device=ctx.device, dtype=load_dtype(ctx.device), token=hf_token
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    ctx.check_stop()

    ctx.set_phase("merging")
    merged = model.merge_and_unload()
    ctx.log(f"merged {adapter_dir.name} into {source}")
    ctx.check_stop()

    ctx.set_phase("saving")
    out = Path(ctx.workdir) / "merged"
    out.mkdir(parents=True, exist_ok=True)
    # One weights file, however large: outputs are flat names the server registers by name.
    merged.save_pretrained(out, max_shard_size="1000GB")
    # The adapter's tokenizer wins when it shipped one: it is what the adapter was trained with.
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else source
    (tokenizer if tokenizer_source == source else load_tokenizer(tokenizer_source)).save_pretrained(out)
    for path in sorted(p for p in out.iterdir() if p.is_file() and p.name != "README.md"):
        ctx.upload_output(path)
    gguf = _export_gguf(ctx, merged, tokenizer, out.parent / "gguf", gguf_types, output_name)
    return {"model": {"name": output_name}, "params_after": count_params(merged), "gguf": gguf}


def _export_gguf(
    ctx: JobContext, merged: Any, tokenizer: Any, directory: Path, types: list[str], name: str
) -> dict[str, dict[str, Any]]:
    """One GGUF per type, each published as an output (`model-<q>.gguf`) as soon as it is written."""
    files: dict[str, dict[str, Any]] = {}
    if types:
        ctx.set_phase("export")
    for quantization in types:
        ctx.check_stop()
        path = directory / f"model-{quantization}.gguf"
        info = write_gguf(merged, tokenizer, path, quantization, name=name)
        ctx.upload_output(info.path)
        files[quantization] = {"name": info.path.name, "size_bytes": info.size_bytes}
        ctx.log(f"wrote {info.path.name} ({info.size_bytes / 1e6:.1f} MB, tensors {info.tensor_types})")
    return files


def _resolve_inputs(ctx: JobContext) -> tuple[Path, str]:
    adapter = ctx.inputs.get("adapter")
    if adapter is None:
        raise InvalidConfig("merge needs an 'adapter' input", param="adapter")
    # A single downloaded file lands as a file; the adapter is a directory of files.
    adapter_dir = Path(adapter) if Path(adapter).is_dir() else Path(adapter).parent
    if not (adapter_dir / "adapter_config.json").exists():
        raise InvalidConfig("the 'adapter' input has no adapter_config.json", param="adapter")
    return adapter_dir, model_source(ctx)
