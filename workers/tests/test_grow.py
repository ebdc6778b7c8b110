"""`train` (grow) jobs: function-preserving growth, training, exact resume, refused configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tunery_worker.context import JobStopped, LocalJobContext
from tunery_worker.errors import InvalidConfig
from tunery_worker.jobs import HANDLERS
from tunery_worker.jobs.grow import grow_layers
from tunery_worker.modeling import count_params, load_model_and_tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A spider has eight legs and a cat has four legs.",
    "Monday comes before Tuesday and Tuesday comes before Wednesday.",
    "Red green blue yellow orange purple black white.",
    "The capital of France is Paris and the capital of Italy is Rome.",
    "Numbers: one two three four five six seven eight nine ten.",
]


def write_dataset(path: Path, count: int = 30) -> Path:
    with open(path, "w") as out:
        for i in range(count):
            out.write(
                json.dumps({"text": f"{SENTENCES[i % len(SENTENCES)]} {SENTENCES[(i * 5 + 1) % 6]}"}) + "\n"
            )
    return path


def make_ctx(tmp_path: Path, model_dir: Path, spec: dict, name: str = "job", **kwargs) -> LocalJobContext:
    workdir = tmp_path / name
    workdir.mkdir()
    dataset = tmp_path / "dataset.jsonl"
    if not dataset.exists():
        write_dataset(dataset)
    return LocalJobContext(
        job_id=f"job_{name}",
        job_type="train",
        spec={"base_model": {"name": "tiny", "source": str(model_dir)}, **spec},
        workdir=workdir,
        inputs={"dataset": dataset},
        **kwargs,
    )


SPEC = {
    "growth": {"new_layers": 2},
    "cycles": 2,
    "steps_per_cycle": 4,
    "lr": 3e-3,
    "batch_size": 4,
    "seq_len": 64,
}


def test_grown_model_computes_the_same_function_then_trains(tmp_path, tiny_llama):
    ctx = make_ctx(tmp_path, tiny_llama, SPEC)
    result = HANDLERS["train"](ctx)

    assert result["function_preservation"] < 1e-5
    assert result["layers_before"] == 2 and result["layers_after"] == 4
    source, _ = load_model_and_tokenizer(tiny_llama)
    per_layer = count_params(source.model.layers[0])
    assert result["params_delta"] == 2 * per_layer
    assert result["params_before"] == count_params(source)
    # 8 steps at a high learning rate on repetitive text: held-out perplexity must fall.
    assert result["ppl_final"] < result["ppl_baseline"]
    assert result["ppl_delta_pct"] < 0
    assert result["steps"] == 8 and result["tokens_processed"] > 0
    assert ctx.phases[:3] == ["initializing", "growing", "training"] and ctx.phases[-1] == "saving"

    train_points = [m for m in ctx.metrics if m["phase"] == "train"]
    assert [m["step"] for m in train_points] == list(range(1, 9))
    assert [m["cycle"] for m in train_points] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert [m["step"] for m in ctx.metrics if m["phase"] == "eval"] == [4, 8]
    assert sorted(ctx.checkpoints) == ["checkpoint-4", "checkpoint-8"]

    # The output is a loadable 4-layer model whose copies start where training moved them.
    assert {"model.safetensors", "config.json", "tokenizer.json", "training_config.json"} <= set(ctx.outputs)
    grown = AutoModelForCausalLM.from_pretrained(ctx.outputs["model.safetensors"].parent)
    assert grown.config.num_hidden_layers == 4
    assert grown.model.layers[1].mlp.down_proj.weight.abs().sum() > 0  # trained off zero


def test_growth_is_exact_and_keeps_the_kv_cache_consistent(tiny_qwen2):
    model, tokenizer = load_model_and_tokenizer(tiny_qwen2)
    model.eval()
    prompt = tokenizer("The quick brown fox", return_tensors="pt")
    with torch.no_grad():
        before = model(**prompt).logits
        generated_before = model.generate(**prompt, max_new_tokens=12, do_sample=False)

    new_indices = grow_layers(model, 3)

    assert new_indices == [1, 3, 4]  # copies close 3 groups of a 2-layer stack: after 0, after 1, after 1
    assert model.config.num_hidden_layers == 5 and len(model.config.layer_types) == 5
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3, 4]
    with torch.no_grad():
        assert torch.equal(model(**prompt).logits, before)
        # Generation uses the KV cache, indexed by layer_idx: it would diverge if indices collided.
        assert torch.equal(model.generate(**prompt, max_new_tokens=12, do_sample=False), generated_before)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, tiny_llama):
    spec = {**SPEC, "growth": {"new_layers": 1}}
    full = make_ctx(tmp_path, tiny_llama, spec, name="full")
    full_result = HANDLERS["train"](full)

    # Stop during step 6 (after the step-4 checkpoint), then resume in a fresh attempt.
    interrupted = make_ctx(tmp_path, tiny_llama, spec, name="interrupted", stop_after_checks=5)
    with pytest.raises(JobStopped):
        HANDLERS["train"](interrupted)
    assert sorted(interrupted.checkpoints) == ["checkpoint-4"]
    step, checkpoint = interrupted.checkpoints["checkpoint-4"]
    resumed = make_ctx(tmp_path, tiny_llama, spec, name="resumed", resume_checkpoint=checkpoint, attempt=2)
    resumed_result = HANDLERS["train"](resumed)

    assert step == 4
    assert [m["step"] for m in resumed.metrics if m["phase"] == "train"] == [5, 6, 7, 8]
    # A checkpoint only resumes the run it came from.
    changed = make_ctx(
        tmp_path, tiny_llama, {**spec, "lr": 1e-3}, name="changed", resume_checkpoint=checkpoint
    )
    with pytest.raises(InvalidConfig, match="different settings"):
        HANDLERS["train"](changed)
    assert resumed_result["loss_final"] == pytest.approx(full_result["loss_final"], rel=1e-5)
    assert resumed_result["ppl_baseline"] == full_result["ppl_baseline"]
    assert resumed_result["tokens_processed"] == full_result["tokens_processed"]
    full_weights = load_file(full.outputs["model.safetensors"])
    resumed_weights = load_file(resumed.outputs["model.safetensors"])
    for name, tensor in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-5, atol=1e-6)


def test_only_new_layers_train_when_asked(tmp_path, tiny_llama):
    spec = {**SPEC, "growth": {"new_layers": 1, "train_only_new_layers": True}, "cycles": 1}
    ctx = make_ctx(tmp_path, tiny_llama, spec)
    HANDLERS["train"](ctx)
    source = load_file(Path(tiny_llama) / "model.safetensors")
    grown = load_file(ctx.outputs["model.safetensors"])
    # Layer 1 is the original layer 1 (the copy went in at index 2, after it), untouched.
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.up_proj.weight"):
        assert torch.equal(grown[name], source[name])
    assert grown["model.layers.2.mlp.down_proj.weight"].abs().sum() > 0


@pytest.mark.parametrize(
    "spec,param",
    [
        ({"lr": 0}, "lr"),
        ({"turns": 0}, "turns"),
        ({"growth": {"new_layers": "two"}}, "growth.new_layers"),
        ({"seq_len": 2.5}, "seq_len"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, tiny_llama, spec, param):
    ctx = make_ctx(tmp_path, tiny_llama, spec)
    with pytest.raises(InvalidConfig) as err:
        HANDLERS["train"](ctx)
    assert err.value.param == param
    assert ctx.phases == []


def test_a_dataset_is_required(tmp_path, tiny_llama):
    ctx = make_ctx(tmp_path, tiny_llama, SPEC)
    ctx.inputs.clear()
    with pytest.raises(InvalidConfig, match="dataset"):
        HANDLERS["train"](ctx)
