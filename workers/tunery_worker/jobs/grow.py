"""`train` jobs: grow a model deeper without changing what it computes, then train it.

Growth is LLaMA Pro's block expansion (Wu et al., 2024). `growth.new_layers` decoder layers are
inserted evenly through the stack, each a copy of the layer just below it with the attention output
projection (`o_proj`) and the MLP down projection (`down_proj`) zeroed, biases included. A pre-norm
decoder layer computes `h + attn(norm(h))`, then `h + mlp(norm(h))`, and both branches end in those
projections, so a new layer adds exactly 0 to the residual stream: the grown network computes the
same function as the original. `function_preservation` is that claim measured: the max |Δlogit|
between the model before growth and right after it, on a calibration batch from the data (0 up to
float rounding). The new layers are not dead: `o_proj`/`down_proj` get gradients at once (their
inputs are a working layer's activations), and once they move off 0 the rest of the layer learns too.

Training is plain causal-LM training of the grown model (or only the new layers, LLaMA Pro's
setting, with `growth.train_only_new_layers`). The run is `turns × cycles × steps_per_cycle`
AdamW steps, with linear warmup then cosine decay to 10% of `lr` over the whole run. A cycle ends
with an evaluation (`eval_loss`) and a checkpoint. By default `steps_per_cycle` makes one turn one
pass over the training data. Perplexity is measured on held-out data (the `eval_dataset` input, or
10% of the dataset) before growth (`ppl_baseline`) and after training (`ppl_final`).

A checkpoint holds the grown weights, optimizer, scheduler, RNG state, step and counters; the data
order is a function of (seed, step), so a resumed job continues exactly where the last one stopped.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from tunery_worker.context import JobContext
from tunery_worker.data import (
    Example,
    batches,
    build_dataset,
    collate,
    epoch_order,
    load_records,
    split_train_eval,
)
from tunery_worker.errors import InvalidConfig, InvalidDataset
from tunery_worker.jobs import spec_fields as f
from tunery_worker.jobs.model_source import load_source_model
from tunery_worker.modeling import (
    causal_lm_loss_sum,
    count_params,
    half_dtype,
    mean_token_loss,
    memory_gb,
    native_bf16,
)

EVAL_FRACTION = 0.1  # held out when no eval_dataset input is given
CALIBRATION_EXAMPLES = 8  # examples used to measure function preservation
MIN_LR_RATIO = 0.1  # cosine decays to this fraction of lr


@dataclass
class GrowConfig:
    new_layers: int | None  # layers to insert (None: a quarter of the current depth, at least 1)
    turns: int  # repeats of the cycle schedule; with the default steps_per_cycle, passes over the data
    cycles: int  # evaluation + checkpoint rounds per turn
    steps_per_cycle: int | None  # optimizer steps per cycle (None: one pass over the data per turn)
    lr: float  # peak AdamW learning rate
    seq_len: int  # tokens per example; longer records are truncated
    batch_size: int  # examples per optimizer step
    warmup_steps: int | None  # linear warmup steps (None: 5% of the run)
    weight_decay: float  # AdamW decoupled weight decay
    max_grad_norm: float  # gradient clipping threshold
    train_only_new_layers: bool  # LLaMA Pro: freeze the original weights, train only the inserted layers
    seed: int  # data order and any sampling

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> GrowConfig:
        growth = f.section(spec, "growth")
        return cls(
            new_layers=f.get_optional_int(growth, "new_layers", minimum=1, maximum=256, where="growth."),
            turns=f.get_int(spec, "turns", 1, minimum=1, maximum=100),
            cycles=f.get_int(spec, "cycles", 4, minimum=1, maximum=1000),
            steps_per_cycle=f.get_optional_int(spec, "steps_per_cycle", minimum=1, maximum=10_000_000),
            lr=f.get_float(spec, "lr", 1e-4, minimum=0.0, maximum=1.0, exclusive_minimum=True),
            seq_len=f.get_int(spec, "seq_len", 256, minimum=8, maximum=131072),
            batch_size=f.get_int(spec, "batch_size", 8, minimum=1, maximum=4096),
            warmup_steps=f.get_optional_int(spec, "warmup_steps", minimum=0),
            weight_decay=f.get_float(spec, "weight_decay", 0.0, minimum=0.0, maximum=1.0),
            max_grad_norm=f.get_float(spec, "max_grad_norm", 1.0, minimum=0.0, exclusive_minimum=True),
            train_only_new_layers=f.get_bool(growth, "train_only_new_layers", False, where="growth."),
            seed=f.get_int(spec, "seed", 0, minimum=0),
        )


def run(ctx: JobContext) -> dict[str, Any]:
    config = GrowConfig.from_spec(ctx.spec)
    if "dataset" not in ctx.inputs:
        raise InvalidConfig("a train job needs a dataset input", param="dataset_id")
    torch.manual_seed(config.seed)

    # --- setup: model, data, checkpoint to resume from ------------------------------------------------
    ctx.set_phase("initializing")
    # Every weight trains: bf16 weights where the GPU computes bf16 natively (half of fp32's memory,
    # so a 7B grow fits where users expect); elsewhere fp32 weights, with fp16 autocast and loss
    # scaling on GPUs without native bf16 (pure fp16 weights would lose small updates entirely).
    model, tokenizer = load_source_model(ctx, torch.bfloat16 if native_bf16(ctx.device) else torch.float32)
    model.config.use_cache = False
    fp16 = half_dtype(ctx.device) == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    layers_before = model.config.num_hidden_layers
    new_layers = config.new_layers or max(1, layers_before // 4)
    train_examples, eval_examples = _load_examples(ctx, tokenizer, config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eval_batches = batches(eval_examples, config.batch_size, pad_id)
    batches_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    steps_per_cycle = config.steps_per_cycle or math.ceil(batches_per_epoch / config.cycles)
    total_steps = config.turns * config.cycles * steps_per_cycle
    warmup_steps = config.warmup_steps if config.warmup_steps is not None else total_steps // 20
    checkpoint = _load_checkpoint(ctx.resume_checkpoint) if ctx.resume_checkpoint else None
    if checkpoint is not None and checkpoint["config"] != asdict(config):
        # The grown shape, the data order and the schedule all come from the config.
        raise InvalidConfig("the resume checkpoint was made with different settings than this job's spec")
    ctx.log(
        f"{len(train_examples)} training / {len(eval_examples)} eval examples; "
        f"{total_steps} steps = {config.turns} turns × {config.cycles} cycles × {steps_per_cycle} steps"
    )

    # --- baseline: perplexity and reference logits of the model as given ----------------------------------
    params_before = count_params(model)
    calibration = collate(eval_examples[:CALIBRATION_EXAMPLES], pad_id)
    if checkpoint is None:
        ppl_baseline = math.exp(mean_token_loss(model, eval_batches))
        reference_logits = _logits(model, calibration)
        ctx.log(f"baseline perplexity {ppl_baseline:.3f} with {layers_before} layers")
    else:
        ppl_baseline = checkpoint["ppl_baseline"]

    # --- growth ---------------------------------------------------------------------------------------
    ctx.set_phase("growing")
    new_indices = grow_layers(model, new_layers)
    params_after = count_params(model)
    if checkpoint is None:
        function_preservation = float((_logits(model, calibration) - reference_logits).abs().max())
        del reference_logits
    else:
        model.load_state_dict(checkpoint["model"])
        function_preservation = checkpoint["function_preservation"]
    ctx.event(
        "model_grown",
        {
            "layers_before": layers_before,
            "layers_after": model.config.num_hidden_layers,
            "new_layer_indices": new_indices,
            "function_preservation": function_preservation,
        },
    )
    ctx.log(
        f"grew {layers_before} → {model.config.num_hidden_layers} layers (new at {new_indices}); "
        f"params {params_before} → {params_after}; max |Δlogit| {function_preservation:.3g}"
    )

    # --- optimizer and schedule (after growth: they must see the grown parameters) ------------------------
    if config.train_only_new_layers:
        new_layer_set = {model.model.layers[i] for i in new_indices}
        for layer in model.model.layers:
            layer.requires_grad_(layer in new_layer_set)
        model.model.embed_tokens.requires_grad_(False)
        model.model.norm.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(warmup_steps, total_steps))
    start_step, tokens_processed, train_seconds = 0, 0, 0.0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["rng"])
        start_step = checkpoint["step"]
        tokens_processed = checkpoint["tokens_processed"]
        train_seconds = checkpoint["train_seconds"]
        ctx.log(f"resumed from step {start_step}")

    # --- training loop --------------------------------------------------------------------------------
    ctx.set_phase("training", {"current_step": start_step, "total_steps": total_steps})
    model.train()
    loss_value, eval_loss = float("nan"), None
    for step in range(start_step, total_steps):
        ctx.check_stop()
        started = time.perf_counter()
        epoch, batch_in_epoch = divmod(step, batches_per_epoch)
        order = epoch_order(len(train_examples), config.seed, epoch)
        picked = order[batch_in_epoch * config.batch_size : (batch_in_epoch + 1) * config.batch_size]
        batch = {k: v.to(ctx.device) for k, v in collate([train_examples[i] for i in picked], pad_id).items()}

        with torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
            loss_sum, n_tokens = causal_lm_loss_sum(
                model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"]
            )
        loss = loss_sum / max(n_tokens, 1)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        elapsed = time.perf_counter() - started
        train_seconds += elapsed
        step_tokens = int(batch["attention_mask"].sum())
        tokens_processed += step_tokens
        loss_value = float(loss.detach())
        cycle = step // steps_per_cycle + 1
        lr_now = scheduler.get_last_lr()[0]
        ctx.metric(
            {
                "step": step + 1,
                "ts": time.time(),
                "phase": "train",
                "epoch": epoch + 1,
                "cycle": cycle,
                "loss": loss_value,
                "lr": lr_now,
                "grad_norm": grad_norm,
                "throughput": step_tokens / elapsed,
                "tokens": tokens_processed,
                **_vram(ctx.device),
            }
        )
        ctx.set_phase(
            "training",
            {
                "current_step": step + 1,
                "total_steps": total_steps,
                "current_loss": loss_value,
                "learning_rate": lr_now,
            },
        )

        # End of a cycle: evaluate, then make the state durable.
        if (step + 1) % steps_per_cycle == 0 or step + 1 == total_steps:
            eval_loss = mean_token_loss(model, eval_batches)
            ctx.metric(
                {"step": step + 1, "ts": time.time(), "phase": "eval", "cycle": cycle, "eval_loss": eval_loss}
            )
            ctx.log(f"step {step + 1}/{total_steps} · loss {loss_value:.4f} · eval_loss {eval_loss:.4f}")
            _save_checkpoint(
                ctx,
                step + 1,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "step": step + 1,
                    "tokens_processed": tokens_processed,
                    "train_seconds": train_seconds,
                    "ppl_baseline": ppl_baseline,
                    "function_preservation": function_preservation,
                    "config": asdict(config),
                },
            )

    # --- save the grown model -------------------------------------------------------------------------
    ctx.set_phase("saving")
    if eval_loss is None:  # resumed at the very end: nothing ran, measure once more
        eval_loss = mean_token_loss(model, eval_batches)
    ppl_final = math.exp(eval_loss)
    output_name = str(ctx.spec.get("output_name") or f"{ctx.job_id}-grown")
    out_dir = Path(ctx.workdir) / "output"
    model.config.use_cache = True
    # One weights file however large: outputs are flat names the server registers by name.
    model.save_pretrained(out_dir, max_shard_size="1000GB")
    tokenizer.save_pretrained(out_dir)
    (out_dir / "training_config.json").write_text(
        json.dumps(
            {
                "job_type": "train",
                "source": ctx.spec.get("base_model"),
                **asdict(config),
                "steps_per_cycle": steps_per_cycle,
                "total_steps": total_steps,
                "new_layers": new_layers,
                "new_layer_indices": new_indices,
            },
            indent=2,
        )
    )
    ctx.upload_dir(out_dir)

    return {
        "ppl_baseline": ppl_baseline,
        "ppl_final": ppl_final,
        "ppl_delta_pct": 100.0 * (ppl_final - ppl_baseline) / ppl_baseline,
        "loss_final": loss_value,
        "eval_loss_final": eval_loss,
        "params_before": params_before,
        "params_after": params_after,
        "params_delta": params_after - params_before,
        "function_preservation": function_preservation,
        "layers_before": layers_before,
        "layers_after": model.config.num_hidden_layers,
        "steps": total_steps,
        "tokens_processed": tokens_processed,
        "train_seconds": train_seconds,
        # Compute seconds on whatever device ran the job (the API's "accelerator (or CPU) seconds").
        "gpu_seconds": train_seconds,
        "model": {"name": output_name},
    }


def grow_layers(model: PreTrainedModel, new_layers: int) -> list[int]:
    """Insert `new_layers` zero-output copies evenly through the decoder stack; return their indices.

    New layer k copies layer ceil((k+1)·L/N) − 1, so the copies close N equal groups of layers, as in
    LLaMA Pro. Everything that indexes layers (attention `layer_idx` for the KV cache, the config's
    layer count and per-layer attention types) is renumbered to the new stack.
    """
    old_layers = list(model.model.layers)
    count = len(old_layers)
    sources = [-(-(k + 1) * count // new_layers) - 1 for k in range(new_layers)]
    grown, new_indices, layer_types = [], [], []
    old_types = list(getattr(model.config, "layer_types", None) or [])
    for i, layer in enumerate(old_layers):
        grown.append(layer)
        layer_types.append(old_types[i] if old_types else None)
        for _ in range(sources.count(i)):
            clone = copy.deepcopy(layer)
            with torch.no_grad():
                for projection in (clone.self_attn.o_proj, clone.mlp.down_proj):
                    projection.weight.zero_()
                    if projection.bias is not None:
                        projection.bias.zero_()
            new_indices.append(len(grown))
            grown.append(clone)
            layer_types.append(old_types[i] if old_types else None)
    for index, layer in enumerate(grown):
        layer.self_attn.layer_idx = index
    model.model.layers = torch.nn.ModuleList(grown)
    model.config.num_hidden_layers = len(grown)
    if old_types:
        model.config.layer_types = layer_types
    return new_indices


def _load_examples(ctx: JobContext, tokenizer, config: GrowConfig) -> tuple[list[Example], list[Example]]:
    fmt = ctx.spec.get("dataset_format")
    try:
        records, fmt = load_records(ctx.inputs["dataset"], fmt)
        examples = build_dataset(records, fmt, tokenizer, config.seq_len).examples
        if "eval_dataset" in ctx.inputs:
            eval_records, eval_fmt = load_records(ctx.inputs["eval_dataset"])
            return examples, build_dataset(eval_records, eval_fmt, tokenizer, config.seq_len).examples
    except ValueError as err:
        raise InvalidDataset(str(err), param="dataset") from None
    train, held_out = split_train_eval(examples, EVAL_FRACTION, config.seed)
    # A one-record dataset cannot be split: measure on what it trains on, rather than on nothing.
    return train, held_out or train


def _warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def _logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits.float()
    model.train(was_training)
    # Padded positions carry no prediction anyone uses; compare real tokens only.
    return logits[batch["attention_mask"].to(device).bool()]


def _vram(device: str) -> dict[str, float]:
    """`vram_gb` is peak accelerator memory, or the process's resident memory on CPU."""
    memory = memory_gb(device)
    return {"vram_gb": memory.get("vram_gb", memory.get("rss_gb", 0.0))}


def _save_checkpoint(ctx: JobContext, step: int, state: dict[str, Any]) -> None:
    path = Path(ctx.workdir) / "checkpoint.pt"
    torch.save(state, path)
    ctx.save_checkpoint(f"checkpoint-{step}", step, path)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
