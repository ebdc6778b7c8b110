"""`contract` jobs: the measured importance finds the layer the model does not need, and only that goes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunery_worker.context import LocalJobContext
from tunery_worker.errors import InvalidConfig
from tunery_worker.jobs import HANDLERS
from tunery_worker.modeling import count_params, load_model_and_tokenizer
from tunery_worker.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("four-layers"), arch="qwen2", layers=4, seed=1)


@pytest.fixture(scope="module")
def with_dead_layer(tmp_path_factory, four_layers) -> Path:
    """The 4-layer model with layer 2 turned into an exact identity (its residual branches output 0)."""
    model, tokenizer = load_model_and_tokenizer(four_layers)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    out = tmp_path_factory.mktemp("dead-layer")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_ctx(tmp_path: Path, model_dir: Path, spec: dict, dataset: Path | None = None) -> LocalJobContext:
    return LocalJobContext(
        job_id="job_contract",
        job_type="contract",
        spec={"base_model": {"name": "tiny", "source": str(model_dir)}, "seq_len": 24, **spec},
        workdir=tmp_path,
        inputs={"dataset": dataset} if dataset else {},
    )


@pytest.mark.parametrize("importance", ["perplexity", "block_influence"])
def test_the_layer_that_contributes_nothing_is_the_one_removed(tmp_path, with_dead_layer, importance):
    spec = {"contraction_ratio": 1.0, "num_layers_to_contract": 1, "importance": importance}
    ctx = make_ctx(tmp_path, with_dead_layer, {**spec, "calibration_examples": 4})
    result = HANDLERS["contract"](ctx)

    assert result["removed_layers"] == [2]
    assert result["layers_before"] == 4 and result["layers_after"] == 3
    # Removing an identity layer changes nothing the model computes.
    assert result["ppl_after"] == pytest.approx(result["ppl_before"], rel=1e-4)
    assert result["ppl_source"] == "model_samples"
    rounds = json.loads(ctx.outputs["contraction.json"].read_text())["rounds"]
    scores = rounds[0]["scores"]
    assert min(scores, key=scores.get) == "2"
    if importance == "block_influence":
        assert scores["2"] == pytest.approx(0.0, abs=1e-5)  # cosine 1: the layer leaves h unchanged


def test_greedy_removal_of_several_layers_and_a_loadable_output(tmp_path, four_layers):
    spec = {"contraction_ratio": 0.5, "num_layers_to_contract": 4, "calibration_examples": 4}
    ctx = make_ctx(tmp_path, four_layers, spec)
    result = HANDLERS["contract"](ctx)

    source, tokenizer = load_model_and_tokenizer(four_layers)
    per_layer = count_params(source.model.layers[0])
    assert len(result["removed_layers"]) == 2 and result["layers_after"] == 2
    assert result["params_delta"] == -2 * per_layer
    assert result["params_after"] == count_params(source) - 2 * per_layer
    rounds = json.loads(ctx.outputs["contraction.json"].read_text())["rounds"]
    assert [len(r["scores"]) for r in rounds] == [4, 3]  # the second choice is re-measured without the first
    assert sorted(r["removed"][0] for r in rounds) == result["removed_layers"]
    assert ctx.phases[0] == "initializing" and "contracting" in ctx.phases and ctx.phases[-1] == "saving"

    contracted = AutoModelForCausalLM.from_pretrained(ctx.outputs["model.safetensors"].parent)
    assert contracted.config.num_hidden_layers == 2 and len(contracted.config.layer_types) == 2
    kept = [i for i in range(4) if i not in result["removed_layers"]]
    torch.testing.assert_close(
        contracted.model.layers[1].mlp.up_proj.weight, source.model.layers[kept[1]].mlp.up_proj.weight
    )
    prompt = tokenizer("The quick brown fox", return_tensors="pt")
    assert (
        contracted.generate(**prompt, max_new_tokens=5, do_sample=False).shape[1]
        == prompt["input_ids"].shape[1] + 5
    )


def test_a_dataset_calibrates_and_measures_perplexity(tmp_path, four_layers):
    dataset = tmp_path / "data.jsonl"
    dataset.write_text(
        "".join(
            json.dumps({"text": f"Sample number {i}: the quick brown fox jumps."}) + "\n" for i in range(8)
        )
    )
    ctx = make_ctx(tmp_path, four_layers, {"contraction_ratio": 1.0, "num_layers_to_contract": 1}, dataset)
    result = HANDLERS["contract"](ctx)
    assert result["ppl_source"] == "dataset"
    assert result["ppl_before"] > 1 and result["ppl_after"] > 1
    assert result["ppl_delta_pct"] == pytest.approx(100 * (result["ppl_after"] / result["ppl_before"] - 1))


@pytest.mark.parametrize(
    "spec,param",
    [
        ({"contraction_ratio": 1.0, "num_layers_to_contract": 4}, "num_layers_to_contract"),  # all 4 layers
        ({"contraction_ratio": 0}, "contraction_ratio"),
        ({"contraction_ratio": 1.5}, "contraction_ratio"),
        ({"importance": "magic"}, "importance"),
    ],
)
def test_impossible_contractions_are_refused(tmp_path, four_layers, spec, param):
    with pytest.raises(InvalidConfig) as err:
        HANDLERS["contract"](make_ctx(tmp_path, four_layers, spec))
    assert err.value.param == param
