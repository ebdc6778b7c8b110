"""`benchmark` jobs: score a model (or a base model + LoRA adapter) on a dataset.

Every record becomes a prompt and a reference answer: `prompt`/`completion` as given; a chat's last
assistant message is the reference and the conversation before it (rendered with the chat template
and an open assistant turn) the prompt; a `text` record is cut at its middle word. Then, over the
first `max_examples` records:

- perplexity: exp(mean NLL per token) of the reference answers given their prompts, counting the
  tokens training would count (completions, assistant turns, or all of a text).
- helpfulness: mean token F1 (SQuAD-style, lower-cased word multisets) between the model's greedy
  answer and the reference — how much of the expected answer the model gives, and nothing else.
- coherence: mean share of distinct word bigrams in the greedy answers (an empty answer scores 0).
  It measures one failure, the one small and over-tuned models show most: looping and repeating
  themselves. It says nothing about truth or relevance.
- consistency: mean token F1 between two answers sampled at `temperature` with different seeds —
  1 when the model says the same thing both times, lower as its answers scatter.

All scores but perplexity lie in [0, 1], higher is better. Per-example answers and scores are
uploaded as `benchmark_samples.jsonl` so every number can be checked by reading.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunery_worker.context import JobContext
from tunery_worker.data import batches, build_dataset, load_records
from tunery_worker.errors import InvalidConfig, InvalidDataset
from tunery_worker.jobs import spec_fields as f
from tunery_worker.jobs.model_source import load_source_model
from tunery_worker.modeling import mean_token_loss
from tunery_worker.text_metrics import distinct_bigram_ratio, token_f1


@dataclass
class BenchmarkConfig:
    max_examples: int  # records scored (the first ones)
    max_new_tokens: int  # longest generated answer
    temperature: float  # sampling temperature of the two consistency samples
    seq_len: int  # prompt + answer tokens for perplexity
    batch_size: int  # prompts per forward / generate call
    seed: int  # the consistency samples use seed and seed + 1

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> BenchmarkConfig:
        return cls(
            max_examples=f.get_int(spec, "max_examples", 200, minimum=1, maximum=100_000),
            max_new_tokens=f.get_int(spec, "max_new_tokens", 64, minimum=1, maximum=4096),
            temperature=f.get_float(
                spec, "temperature", 0.7, minimum=0.0, maximum=2.0, exclusive_minimum=True
            ),
            seq_len=f.get_int(spec, "seq_len", 512, minimum=8, maximum=131072),
            batch_size=f.get_int(spec, "batch_size", 8, minimum=1, maximum=1024),
            seed=f.get_int(spec, "seed", 0, minimum=0),
        )


def run(ctx: JobContext) -> dict[str, Any]:
    config = BenchmarkConfig.from_spec(ctx.spec)
    if "dataset" not in ctx.inputs:
        raise InvalidConfig("a benchmark job needs a dataset input", param="dataset_id")

    # --- setup: model (+ adapter), data ----------------------------------------------------------------
    ctx.set_phase("loading_model")
    model, tokenizer = load_source_model(ctx)  # with an adapter input, merged into its base
    model.eval()
    started = time.perf_counter()
    ctx.set_phase("data_preparation")
    try:
        records, fmt = load_records(ctx.inputs["dataset"], ctx.spec.get("dataset_format"))
        records = records[: config.max_examples]
        examples = build_dataset(records, fmt, tokenizer, config.seq_len).examples
    except ValueError as err:
        raise InvalidDataset(str(err), param="dataset") from None
    tasks = [_prompt_and_reference(record, fmt, tokenizer) for record in records]
    # A rendered chat prompt already holds its special tokens; plain prompts get BOS etc. as usual.
    add_special_tokens = fmt != "chat"
    # Left padding, so that every prompt in a batch ends where generation starts.
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # --- perplexity of the references ------------------------------------------------------------------
    ctx.set_phase("evaluating", {"current_step": 0, "total_steps": len(tasks)})
    perplexity = math.exp(mean_token_loss(model, batches(examples, config.batch_size, pad_id)))
    tokens_evaluated = sum(example.trained_tokens for example in examples)

    # --- answers: greedy, and two samples ---------------------------------------------------------------
    rows: list[dict[str, Any]] = []
    for start in range(0, len(tasks), config.batch_size):
        ctx.check_stop()
        chunk = tasks[start : start + config.batch_size]
        prompts = [prompt for prompt, _ in chunk]
        greedy = _generate(model, tokenizer, prompts, add_special_tokens, config, sample_seed=None)
        first = _generate(model, tokenizer, prompts, add_special_tokens, config, sample_seed=config.seed)
        second = _generate(model, tokenizer, prompts, add_special_tokens, config, sample_seed=config.seed + 1)
        for (prompt, reference), answer, sample_a, sample_b in zip(chunk, greedy, first, second, strict=True):
            rows.append(
                {
                    "prompt": prompt,
                    "reference": reference,
                    "answer": answer,
                    "samples": [sample_a, sample_b],
                    "helpfulness": token_f1(answer, reference),
                    "coherence": distinct_bigram_ratio(answer) if answer.strip() else 0.0,
                    "consistency": token_f1(sample_a, sample_b),
                }
            )
        ctx.set_phase("evaluating", {"current_step": len(rows), "total_steps": len(tasks)})

    scores = {
        "perplexity": perplexity,
        **{
            name: sum(row[name] for row in rows) / len(rows)
            for name in ("coherence", "consistency", "helpfulness")
        },
    }
    ctx.log(" · ".join(f"{name} {value:.4f}" for name, value in scores.items()))

    ctx.set_phase("saving")
    samples_path = Path(ctx.workdir) / "benchmark_samples.jsonl"
    with open(samples_path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    ctx.upload_output(samples_path)

    return {
        "scores": scores,
        "perplexity": perplexity,
        "examples": len(rows),
        "tokens_evaluated": tokens_evaluated,
        "gpu_seconds": round(time.perf_counter() - started, 3),
    }


def _prompt_and_reference(
    record: dict[str, Any], fmt: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[str, str]:
    if fmt == "prompt_completion":
        return record["prompt"], record["completion"]
    if fmt == "chat":
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        return str(prompt), messages[last]["content"]
    words = record["text"].split(" ")
    middle = max(1, len(words) // 2)
    return " ".join(words[:middle]), " ".join(words[middle:])


@torch.no_grad()
def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    add_special_tokens: bool,
    config: BenchmarkConfig,
    sample_seed: int | None,
) -> list[str]:
    """Greedy answers (`sample_seed` None) or answers sampled at `temperature` under that seed."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    inputs = inputs.to(device)
    options: dict[str, Any] = {"do_sample": False}
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
        options = {"do_sample": True, "temperature": config.temperature, "top_k": 0, "top_p": 1.0}
    output = model.generate(  # type: ignore[operator]  # GenerationMixin, unseen by the stubs
        **inputs,
        max_new_tokens=config.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **options,
    )
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
