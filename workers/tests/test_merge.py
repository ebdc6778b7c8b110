"""Merging a trained LoRA adapter: the merged model computes what base + adapter computed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tunery_worker.context import LocalJobContext
from tunery_worker.jobs import finetune, merge
from tunery_worker.modeling import count_params


def trained_adapter(tmp_path: Path, base: Path) -> Path:
    """A few high-lr LoRA steps, so B is far from its zero init and the merge changes real weights."""
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(json.dumps({"text": f"the number {i} is {i * i}"}) + "\n" for i in range(6)))
    ctx = LocalJobContext(
        job_id="job_ft",
        job_type="finetune",
        workdir=tmp_path / "ft",
        inputs={"dataset": dataset},
        spec={
            "method": "lora",
            "base_model": {"name": "tiny", "source": str(base)},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
            "training": {"max_steps": 5, "batch_size": 6, "learning_rate": 2e-2, "save_steps": 100},
        },
    )
    finetune.run(ctx)
    # What the runner does with several files of one role: one directory holding them all.
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    for name, path in ctx.outputs.items():
        (adapter_dir / name).write_bytes(path.read_bytes())
    return adapter_dir


def test_merged_logits_equal_base_plus_adapter(tmp_path: Path, tiny_llama: Path) -> None:
    adapter_dir = trained_adapter(tmp_path, tiny_llama)
    ctx = LocalJobContext(
        job_id="job_merge",
        job_type="merge",
        workdir=tmp_path / "merge",
        inputs={"adapter": adapter_dir},
        spec={"base_model": {"name": "tiny", "source": str(tiny_llama)}, "output_name": "tiny-merged"},
    )
    result = merge.run(ctx)
    assert result["model"] == {"name": "tiny-merged"}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(ctx.outputs)

    merged_dir = tmp_path / "merged-download"
    merged_dir.mkdir()
    for name, path in ctx.outputs.items():
        (merged_dir / name).write_bytes(path.read_bytes())
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(adapter_dir)).eval()

    input_ids = torch.randint(
        0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = with_adapter(input_ids=input_ids).logits
        got = merged(input_ids=input_ids).logits
        untouched = AutoModelForCausalLM.from_pretrained(str(tiny_llama))(input_ids=input_ids).logits
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got - untouched).abs().max().item() > 1e-2  # the adapter really changed the model
    assert result["params_after"] == count_params(merged)


def test_export_gguf_publishes_one_readable_file_per_quantization(tmp_path: Path, tiny_llama: Path) -> None:
    from gguf import GGUFReader

    adapter_dir = trained_adapter(tmp_path, tiny_llama)
    ctx = LocalJobContext(
        job_id="job_merge",
        job_type="merge",
        workdir=tmp_path / "merge",
        inputs={"adapter": adapter_dir},
        spec={
            "base_model": {"name": "tiny", "source": str(tiny_llama)},
            "output_name": "tiny-merged",
            "export_gguf": True,
            "quantization_types": ["q8_0", "f16"],
        },
    )
    result = merge.run(ctx)
    assert set(result["gguf"]) == {"q8_0", "f16"}
    for quantization in ("q8_0", "f16"):
        name = f"model-{quantization}.gguf"
        assert result["gguf"][quantization] == {"name": name, "size_bytes": ctx.outputs[name].stat().st_size}
        reader = GGUFReader(ctx.outputs[name])
        arch = reader.fields["general.architecture"]
        assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
        tensors = {t.name: t for t in reader.tensors}
        assert "token_embd.weight" in tensors and "blk.0.attn_q.weight" in tensors
    assert "model.safetensors" in ctx.outputs  # the merged weights are still published


def test_unsupported_quantization_fails_before_loading(tmp_path: Path, tiny_llama: Path) -> None:
    import pytest

    from tunery_worker.errors import InvalidConfig

    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text("{}")
    ctx = LocalJobContext(
        job_id="job_merge",
        job_type="merge",
        workdir=tmp_path / "merge",
        inputs={"adapter": adapter_dir},
        spec={
            "base_model": {"name": "tiny", "source": str(tiny_llama)},
            "export_gguf": True,
            "quantization_types": ["q9_z"],
        },
    )
    with pytest.raises(InvalidConfig) as raised:
        merge.run(ctx)
    assert raised.value.param == "quantization_types"
    assert ctx.outputs == {}
