"""`contract` jobs: remove the decoder layers the model needs least.

How many: `round(contraction_ratio × num_layers_to_contract)` layers, at least one, and never all of
them (a model with L layers can lose at most L − 1). `num_layers_to_contract` is the size of the
cut at full aggressiveness; `contraction_ratio` (0–1] scales it.

Which ones, by a measured importance score (`importance`):
- `perplexity` (default; the criterion of "Shortened LLaMA", Kim et al. 2024, applied greedily): for
  every remaining layer, run the model with that layer skipped and measure the mean token NLL on a
  calibration set; remove the layer whose absence raises it least; repeat on the reduced model until
  enough are gone. Greedy re-measuring accounts for layers that are redundant with each other (two
  near-copies each look removable, but not both). Cost: Σ_j (L − j) passes over the calibration set.
- `block_influence` (ShortGPT, Men et al. 2024): one pass; a layer's score is 1 − the mean cosine
  similarity between the hidden state entering and leaving it, over calibration tokens. The layers
  that change the residual stream least are removed together. Cheap, but measures each layer alone.

Calibration data: half of the `dataset` input when one is given (the other half measures
perplexity, so the layers are not picked on the very text they are judged on). Without a dataset,
the model writes its own calibration set: sequences sampled from it at temperature 1 from BOS,
i.e. text from the model's own distribution; perplexity before/after is then measured on those
samples (`ppl_source: "model_samples"`).

There is no training, so no checkpoint: a retried job recomputes the same choice (fixed seed).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunery_worker.context import JobContext
from tunery_worker.data import Example, batches, build_dataset, load_records, split_train_eval
from tunery_worker.errors import InvalidConfig, InvalidDataset
from tunery_worker.jobs import spec_fields as f
from tunery_worker.jobs.model_source import load_source_model
from tunery_worker.modeling import count_params, mean_token_loss

IMPORTANCE_METHODS = ("perplexity", "block_influence")


@dataclass
class ContractConfig:
    contraction_ratio: float  # (0, 1]: fraction of num_layers_to_contract actually removed
    num_layers_to_contract: int  # layers removed at ratio 1
    importance: str  # perplexity (greedy, re-measured after each removal) | block_influence (one pass)
    calibration_examples: int  # sequences the importance is measured on
    seq_len: int  # tokens per calibration / evaluation sequence
    batch_size: int  # sequences per forward pass
    seed: int  # dataset split and model samples

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ContractConfig:
        return cls(
            contraction_ratio=f.get_float(
                spec, "contraction_ratio", 0.5, minimum=0.0, maximum=1.0, exclusive_minimum=True
            ),
            num_layers_to_contract=f.get_int(spec, "num_layers_to_contract", 8, minimum=1, maximum=1024),
            importance=f.get_str(spec, "importance", "perplexity", choices=IMPORTANCE_METHODS),
            calibration_examples=f.get_int(spec, "calibration_examples", 32, minimum=1, maximum=4096),
            seq_len=f.get_int(spec, "seq_len", 256, minimum=8, maximum=131072),
            batch_size=f.get_int(spec, "batch_size", 8, minimum=1, maximum=1024),
            seed=f.get_int(spec, "seed", 0, minimum=0),
        )

    @property
    def layers_to_remove(self) -> int:
        return max(1, round(self.contraction_ratio * self.num_layers_to_contract))


def run(ctx: JobContext) -> dict[str, Any]:
    config = ContractConfig.from_spec(ctx.spec)
    torch.manual_seed(config.seed)

    # --- setup: model, and how many layers may go ------------------------------------------------------
    ctx.set_phase("initializing")
    model, tokenizer = load_source_model(ctx)
    model.eval()
    model.config.use_cache = False
    layers_before = model.config.num_hidden_layers
    remove_count = config.layers_to_remove
    if remove_count >= layers_before:
        raise InvalidConfig(
            f"contraction_ratio × num_layers_to_contract asks to remove {remove_count} of the model's "
            f"{layers_before} layers; at most {layers_before - 1} can go",
            param="num_layers_to_contract",
        )
    started = time.perf_counter()

    # --- calibration and evaluation data ------------------------------------------------------------
    calibration, evaluation, ppl_source = _calibration_and_eval(ctx, model, tokenizer, config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    calibration_batches = batches(calibration, config.batch_size, pad_id)
    eval_batches = batches(evaluation, config.batch_size, pad_id)
    params_before = count_params(model)
    ppl_before = math.exp(mean_token_loss(model, eval_batches))
    ctx.log(
        f"removing {remove_count} of {layers_before} layers by {config.importance}; "
        f"{len(calibration)} calibration sequences; perplexity before {ppl_before:.3f} ({ppl_source})"
    )

    # --- choose the layers ------------------------------------------------------------------------------
    ctx.set_phase("contracting")
    original = list(model.model.layers)
    original_types = list(getattr(model.config, "layer_types", None) or [])
    kept = list(range(layers_before))  # original indices of the layers still in the model
    rounds: list[dict[str, Any]] = []
    if config.importance == "block_influence":
        scores = _block_influence(model, calibration_batches)
        ctx.check_stop()
        removed = sorted(sorted(kept, key=lambda i: scores[i])[:remove_count])
        rounds.append({"scores": {str(i): scores[i] for i in kept}, "removed": removed})
        kept = [i for i in kept if i not in removed]
    else:
        total_passes = sum(layers_before - j for j in range(remove_count))
        passes = 0
        for _ in range(remove_count):
            nll_without: dict[int, float] = {}
            for candidate in kept:
                ctx.check_stop()
                _use_layers(model, original, original_types, [i for i in kept if i != candidate])
                nll_without[candidate] = mean_token_loss(model, calibration_batches)
                passes += 1
                ctx.set_phase("contracting", {"current_step": passes, "total_steps": total_passes})
            victim = min(nll_without, key=lambda i: nll_without[i])
            kept.remove(victim)
            rounds.append({"scores": {str(i): v for i, v in nll_without.items()}, "removed": [victim]})
            ctx.log(f"removed layer {victim}: calibration NLL without it {nll_without[victim]:.4f}")
    _use_layers(model, original, original_types, kept)
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index  # the KV cache is indexed by position in the new stack
    removed_layers = sorted(set(range(layers_before)) - set(kept))
    ctx.event("layers_removed", {"removed_layers": removed_layers, "importance": config.importance})

    # --- measure and save -------------------------------------------------------------------------------
    ctx.set_phase("evaluating")
    ppl_after = math.exp(mean_token_loss(model, eval_batches))
    params_after = count_params(model)
    compute_seconds = time.perf_counter() - started
    ctx.log(f"kept layers {kept}; perplexity {ppl_before:.3f} → {ppl_after:.3f}")

    ctx.set_phase("saving")
    output_name = str(ctx.spec.get("output_name") or f"{ctx.job_id}-contracted")
    out_dir = Path(ctx.workdir) / "output"
    model.config.use_cache = True
    model.save_pretrained(out_dir, max_shard_size="1000GB")
    tokenizer.save_pretrained(out_dir)
    (out_dir / "contraction.json").write_text(
        json.dumps(
            {
                "source": ctx.spec.get("base_model"),
                **asdict(config),
                "removed_layers": removed_layers,
                "kept_layers": kept,
                "rounds": rounds,
                "ppl_source": ppl_source,
            },
            indent=2,
        )
    )
    ctx.upload_dir(out_dir)

    return {
        "params_before": params_before,
        "params_after": params_after,
        "params_delta": params_after - params_before,
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        # The same numbers under the names every training job's result uses.
        "ppl_baseline": ppl_before,
        "ppl_final": ppl_after,
        "ppl_delta_pct": 100.0 * (ppl_after - ppl_before) / ppl_before,
        "ppl_source": ppl_source,
        "layers_before": layers_before,
        "layers_after": len(kept),
        "removed_layers": removed_layers,
        "importance": config.importance,
        "gpu_seconds": compute_seconds,
        "model": {"name": output_name},
    }


def _use_layers(
    model: PreTrainedModel, original: list[torch.nn.Module], original_types: list[str], keep: list[int]
) -> None:
    """Point the model at a subset of its original layers (everything that counts layers follows)."""
    model.model.layers = torch.nn.ModuleList(original[i] for i in keep)
    model.config.num_hidden_layers = len(keep)
    if original_types:
        model.config.layer_types = [original_types[i] for i in keep]


@torch.no_grad()
def _block_influence(
    model: PreTrainedModel, calibration_batches: list[dict[str, torch.Tensor]]
) -> list[float]:
    """1 − mean cosine(hidden entering, hidden leaving) per layer, over real (unpadded) calibration tokens."""
    device = next(model.parameters()).device
    layers = list(model.model.layers)
    similarity_sums, tokens = [0.0] * len(layers), 0
    mask: torch.Tensor | None = None

    def measure(index: int):
        def hook(_module, args, kwargs, output):
            entering = args[0] if args else kwargs["hidden_states"]
            leaving = output[0] if isinstance(output, tuple) else output
            cosine = torch.nn.functional.cosine_similarity(entering.float(), leaving.float(), dim=-1)
            similarity_sums[index] += float(cosine[mask].sum())

        return hook

    handles = [layer.register_forward_hook(measure(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for batch in calibration_batches:
            mask = batch["attention_mask"].to(device).bool()
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask.long())
            tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return [1.0 - total / tokens for total in similarity_sums]


def _calibration_and_eval(
    ctx: JobContext, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ContractConfig
) -> tuple[list[Example], list[Example], str]:
    if "dataset" in ctx.inputs:
        try:
            records, fmt = load_records(ctx.inputs["dataset"], ctx.spec.get("dataset_format"))
            examples = build_dataset(records, fmt, tokenizer, config.seq_len).examples
        except ValueError as err:
            raise InvalidDataset(str(err), param="dataset") from None
        calibration, evaluation = split_train_eval(examples, 0.5, config.seed)
        # A one-record dataset cannot be split; it then serves as both.
        return calibration[: config.calibration_examples], evaluation or calibration, "dataset"
    samples = _sample_from_model(model, tokenizer, config)
    return samples, samples, "model_samples"


@torch.no_grad()
def _sample_from_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ContractConfig
) -> list[Example]:
    """Sequences drawn from the model itself (temperature 1, no truncation of the distribution)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise InvalidConfig(
            "without a dataset, contraction samples from the model, which needs a BOS or EOS token"
        )
    device = next(model.parameters()).device
    generator_seed = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    prompt = torch.full((config.calibration_examples, 1), start, dtype=torch.long, device=device)
    output = model.generate(  # type: ignore[operator]  # GenerationMixin, unseen by the stubs
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=config.seq_len - 1,
        min_new_tokens=config.seq_len - 1,  # full-length sequences: EOS does not end them early
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start,
        use_cache=True,
    )
    torch.random.set_rng_state(generator_seed)
    return [Example(input_ids=row.tolist(), labels=row.tolist()) for row in output.cpu()]
