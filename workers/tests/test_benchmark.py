"""`benchmark` jobs: each score measured against cases whose right value is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tunery_worker.context import LocalJobContext
from tunery_worker.jobs import HANDLERS
from tunery_worker.modeling import load_model_and_tokenizer
from tunery_worker.text_metrics import distinct_bigram_ratio, token_f1

PROMPTS = ["The quick brown fox", "Monday Tuesday", "Red green blue", "Hello world!"]


def make_ctx(tmp_path: Path, records: list[dict], spec: dict, inputs: dict | None = None) -> LocalJobContext:
    dataset = tmp_path / "bench.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return LocalJobContext(
        job_id="job_bench",
        job_type="benchmark",
        spec={"max_new_tokens": 8, **spec},
        workdir=workdir,
        inputs={"dataset": dataset, **(inputs or {})},
    )


def greedy_answers(model_dir: Path) -> list[dict]:
    """prompt/completion records whose completion is exactly the model's own greedy answer."""
    model, tokenizer = load_model_and_tokenizer(model_dir)
    records = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(  # type: ignore[operator]  # GenerationMixin, unseen by the stubs
                **ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        records.append({"prompt": prompt, "completion": answer})
    return records


def test_scores_are_exact_on_a_model_that_gives_the_reference_answers(tmp_path, tiny_llama):
    records = greedy_answers(tiny_llama)
    ctx = make_ctx(tmp_path, records, {"batch_size": 1, "temperature": 0.7}, inputs={})
    ctx.spec["base_model"] = {"name": "tiny", "source": str(tiny_llama)}
    result = HANDLERS["benchmark"](ctx)

    scores = result["scores"]
    assert set(scores) == {"perplexity", "coherence", "consistency", "helpfulness"}
    assert scores["helpfulness"] == pytest.approx(1.0)  # its greedy answer is the reference
    assert result["perplexity"] == scores["perplexity"] > 1
    assert result["examples"] == 4 and result["tokens_evaluated"] > 0
    rows = [json.loads(line) for line in ctx.outputs["benchmark_samples.jsonl"].read_text().splitlines()]
    assert [row["answer"] for row in rows] == [r["completion"] for r in records]
    expected_coherence = sum(
        distinct_bigram_ratio(r["completion"]) if r["completion"].strip() else 0.0 for r in records
    )
    assert scores["coherence"] == pytest.approx(expected_coherence / 4)
    assert scores["consistency"] == pytest.approx(sum(token_f1(*row["samples"]) for row in rows) / 4)
    assert all(0.0 <= scores[k] <= 1.0 for k in ("coherence", "consistency", "helpfulness"))


def test_consistency_falls_as_sampling_gets_hotter(tmp_path, tiny_llama):
    records = [{"text": f"{p} jumps over the lazy dog and runs away"} for p in PROMPTS]
    spec = {"base_model": {"name": "tiny", "source": str(tiny_llama)}, "max_new_tokens": 12}
    cold = HANDLERS["benchmark"](make_ctx(tmp_path, records, {**spec, "temperature": 0.01}))
    hot = HANDLERS["benchmark"](make_ctx(tmp_path, records, {**spec, "temperature": 2.0}))
    assert cold["scores"]["consistency"] > 0.9
    assert hot["scores"]["consistency"] < cold["scores"]["consistency"] - 0.3
    assert cold["perplexity"] == hot["perplexity"]  # perplexity does not depend on sampling


def test_an_adapter_is_applied_to_its_base(tmp_path, tiny_llama):
    model, tokenizer = load_model_and_tokenizer(tiny_llama)
    torch.manual_seed(0)
    # init_lora_weights=False: random B, so the adapter really changes the model.
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
    )
    adapter_dir = tmp_path / "adapter"
    get_peft_model(model, lora).save_pretrained(adapter_dir)
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    records = [{"messages": messages}] * 2
    spec = {"base_model": {"name": "tiny", "source": str(tiny_llama)}}

    base = HANDLERS["benchmark"](make_ctx(tmp_path, records, spec))
    adapted_ctx = make_ctx(tmp_path, records, spec, inputs={"adapter": adapter_dir})
    adapted = HANDLERS["benchmark"](adapted_ctx)
    assert adapted["perplexity"] != pytest.approx(base["perplexity"], rel=1e-3)
    row = json.loads(adapted_ctx.outputs["benchmark_samples.jsonl"].read_text().splitlines()[0])
    assert row["prompt"].endswith("<|im_start|>assistant\n") and row["reference"] == "Paris."
