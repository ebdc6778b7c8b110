"""What a job starts from: an adapter input is merged into its base, and the hub token reaches the loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from tunery_worker.context import LocalJobContext
from tunery_worker.jobs import HANDLERS, model_source
from tunery_worker.modeling import load_model_and_tokenizer

IDS = torch.tensor([[1, 5, 9, 13, 17, 21]])


def random_adapter(base: Path, out: Path) -> Path:
    """An adapter whose B is random (not peft's zero init), so it really changes what the model computes."""
    model, _ = load_model_and_tokenizer(base)
    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
    )
    get_peft_model(model, lora).save_pretrained(out)
    return out


def make_ctx(tmp_path: Path, base: Path, job_type: str, spec: dict, inputs: dict) -> LocalJobContext:
    return LocalJobContext(
        job_id=f"job_{job_type}",
        job_type=job_type,
        spec={"base_model": {"name": "tiny", "source": str(base)}, **spec},
        workdir=tmp_path / job_type,
        inputs=inputs,
    )


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_an_adapter_input_is_merged_into_its_base(tmp_path: Path, tiny_llama: Path) -> None:
    adapter_dir = random_adapter(tiny_llama, tmp_path / "adapter")
    ctx = make_ctx(tmp_path, tiny_llama, "contract", {}, {"adapter": adapter_dir})

    model, _ = model_source.load_source_model(ctx)

    base, _ = load_model_and_tokenizer(tiny_llama)
    expected = logits(PeftModel.from_pretrained(base, str(adapter_dir)))
    assert not isinstance(model, PeftModel)
    assert torch.allclose(logits(model), expected, atol=1e-5)
    bare, _ = load_model_and_tokenizer(tiny_llama)
    assert not torch.allclose(logits(model), logits(bare), atol=1e-3)


def test_a_contraction_starts_from_the_adapter_model_it_names(tmp_path: Path, tiny_llama: Path) -> None:
    adapter_dir = random_adapter(tiny_llama, tmp_path / "adapter")
    spec = {"contraction_ratio": 1.0, "num_layers_to_contract": 1, "seq_len": 24, "calibration_examples": 4}
    bare = HANDLERS["contract"](make_ctx(tmp_path / "bare", tiny_llama, "contract", spec, {}))
    adapted = HANDLERS["contract"](
        make_ctx(tmp_path / "adapted", tiny_llama, "contract", spec, {"adapter": adapter_dir})
    )
    # The model it measures before removing a layer is base + adapter, not the bare base.
    assert adapted["ppl_before"] != pytest.approx(bare["ppl_before"], rel=1e-3)


@pytest.mark.parametrize("with_adapter", [False, True])
def test_the_hub_token_reaches_the_loader(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, with_adapter: bool
) -> None:
    seen: list[str | None] = []
    real = model_source.load_model_and_tokenizer

    def loader(source: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("token"))
        return real(source, **{k: v for k, v in kwargs.items() if k != "token"})

    monkeypatch.setattr(model_source, "load_model_and_tokenizer", loader)
    inputs = {"adapter": random_adapter(tiny_llama, tmp_path / "adapter")} if with_adapter else {}
    ctx = make_ctx(tmp_path, tiny_llama, "train", {"hf_token": "hf_secret"}, inputs)
    model_source.load_source_model(ctx)
    assert seen == ["hf_secret"]


def random_adapter_of(base: Path, out: Path, r: int, targets: list[str] | str, seed: int) -> Path:
    model, _ = load_model_and_tokenizer(base)
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=r, lora_alpha=3 * r, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    get_peft_model(model, lora).save_pretrained(out)
    return out


def test_stacked_adapters_compute_what_both_did(tmp_path: Path, tiny_llama: Path) -> None:
    below = random_adapter_of(tiny_llama, tmp_path / "below", 4, ["q_proj", "v_proj", "embed_tokens"], seed=1)
    above = random_adapter_of(tiny_llama, tmp_path / "above", 2, ["v_proj", "down_proj"], seed=2)
    base, _ = load_model_and_tokenizer(tiny_llama)
    expected = logits(PeftModel.from_pretrained(model_source.merge_adapter(base, below), str(above)))

    model_source.stack_adapters(below, above)

    stacked = json.loads((above / "adapter_config.json").read_text())
    assert (stacked["r"], stacked["lora_alpha"]) == (6, 6)
    assert stacked["target_modules"] == ["down_proj", "embed_tokens", "q_proj", "v_proj"]
    fresh, _ = load_model_and_tokenizer(tiny_llama)
    assert torch.allclose(logits(PeftModel.from_pretrained(fresh, str(above))), expected, atol=1e-4)


def test_a_finetune_from_an_adapter_outputs_both_as_one_adapter(tmp_path: Path, tiny_llama: Path) -> None:
    start = random_adapter_of(tiny_llama, tmp_path / "start", 4, "all-linear", seed=3)
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(json.dumps({"text": f"the number {i} is {i * i}"}) + "\n" for i in range(6)))
    spec = {
        "method": "lora",
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {"max_steps": 2, "batch_size": 6, "learning_rate": 1e-2, "save_steps": 100},
    }
    ctx = make_ctx(tmp_path, tiny_llama, "finetune", spec, {"dataset": dataset, "adapter": start})
    HANDLERS["finetune"](ctx)

    out = ctx.outputs["adapter_config.json"].parent
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 6
    weights = load_file(str(out / "adapter_model.safetensors"))
    started = load_file(str(start / "adapter_model.safetensors"))
    key = next(k for k in started if k.endswith("q_proj.lora_A.weight"))
    # the start adapter's factors come first, unchanged (its B scaled by its alpha/r, here 3)
    assert torch.equal(weights[key][:4], started[key])
    b_key = key.replace("lora_A", "lora_B")
    assert torch.allclose(weights[b_key][:, :4], 3 * started[b_key])
