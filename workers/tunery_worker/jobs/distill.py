"""`distill` jobs: best-of-N sampling from a teacher, curation into preference pairs, BOND-style
training of a LoRA student, and optional GGUF export.

Phases (`ctx.set_phase`, progress `{prompts_done, prompts_total, training_step, ...}`):

1. initializing — check the config (unsupported GGUF types fail here, before any cost), read the
   prompts (`prompts` input, JSONL of `{"prompt"}`; `{"messages"}` or `{"text"}` records also work),
   load the student and the teacher.
2. data_generation — `n_samples` candidates per prompt at `temperature`, at most `max_new_tokens`
   each. The teacher is an OpenAI-compatible chat-completions endpoint (`provider: openai`) or a
   model this worker loads (`provider: local`). Generated samples are checkpointed as they come, so
   a retried job does not pay the teacher twice.
3. curation — every candidate gets a score; per prompt the best and the worst form a preference pair.
   The score is the teacher's own length-normalised log-likelihood of the candidate (mean token
   log-prob) when it is known for every candidate: always for a local teacher (computed here at
   temperature 1), and for an endpoint that returns `logprobs`. Otherwise a quality heuristic: the
   share of distinct word bigrams (1 = no repetition, → 0 for a looping sample). Either way, a
   candidate cut off at `max_new_tokens` ranks below every complete one, and empty candidates are
   dropped. A prompt whose best and worst tie keeps its best sample but makes no pair.
4. training — LoRA on the student, `training_steps` AdamW steps over batches of curated prompts.
   With y⁺ the best and y⁻ the worst sample for prompt x, π_θ the student with the adapter and
   π_ref the same student with the adapter switched off, and ℓ(y) = (1/|y|) Σ_t log π(y_t | x, y_<t):

       L = −ℓ_θ(y⁺)                                                      (distillation)
           + bond_beta  · −log σ( [ℓ_θ(y⁺) − ℓ_ref(y⁺)] − [ℓ_θ(y⁻) − ℓ_ref(y⁻)] )   (preference)
           + bond_gamma · mean_t KL( π_θ(·|x, y_<t) ‖ π_ref(·|x, y_<t) )             (anchor)

   The first term is BOND's forward-KL half: maximum likelihood on best-of-N samples moves the
   student towards the best-of-N distribution. The second stands in for BOND's backward-KL half (a
   policy-gradient term with a best-of-N quantile reward in the paper, Sessa et al. 2024) with an
   offline DPO-style pairwise term on length-normalised log-ratios, averaged over prompts that have
   a pair. The third is an exact full-vocabulary KL to the frozen reference at every token of the
   curated samples. What this is not: no on-policy sampling from the student and no moving (EMA)
   anchor, both of which J-BOND uses. At the first step the adapter is zero, so the preference
   term is log 2 and the KL term is 0.
5. export — the adapter (`adapter_model.safetensors`, `adapter_config.json`, tokenizer files),
   `train_config.json`, the curated pairs (`curated_pairs.jsonl`), and with `export_gguf` one
   `model-<q>.gguf` per quantization type from the adapter merged into the student.

Every training checkpoint also publishes its adapter (with the tokenizer) as the job's outputs, so a
cancelled or failed distillation keeps the last checkpoint's adapter; the export overwrites them.

Meters for cost: teacher prompt/completion tokens (the endpoint's `usage`, or counted locally) and
compute seconds, reported in progress and in the result.
"""

from __future__ import annotations

import gc
import json
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunery_worker import egress
from tunery_worker.context import JobContext
from tunery_worker.data import Example, collate, epoch_order, read_jsonl, tokenize_record
from tunery_worker.errors import InvalidConfig, InvalidDataset, JobError
from tunery_worker.gguf_export import validate_quantization_types, write_gguf
from tunery_worker.jobs import spec_fields as f
from tunery_worker.jobs.finetune import lr_factor
from tunery_worker.jobs.model_source import checked_source, load_source_model
from tunery_worker.modeling import (
    bitsandbytes_available,
    causal_lm_loss_sum,
    chunk_rows,
    fuse_lora_adds,
    half_dtype,
    hidden_and_head,
    load_dtype,
    load_model_and_tokenizer,
)
from tunery_worker.text_metrics import distinct_bigram_ratio

CHECKPOINT_FORMAT = "tunery-distill-checkpoint/1"
PROVIDERS = ("openai", "local")
OPENAI_BASE_URL = "https://api.openai.com/v1"
GENERATION_CHECKPOINT_EVERY = 25  # prompts between checkpoints of generated samples
TEACHER_ATTEMPTS = 4  # tries per teacher request on timeouts, 429 and 5xx
TEACHER_BACKOFF_S = 1.0  # first retry delay; doubles each time
MAX_GRAD_NORM = 1.0


class TeacherError(JobError):
    """The teacher endpoint kept failing (network, 429, 5xx): retryable, another attempt may get through."""

    code = "teacher_error"


# --- config ----------------------------------------------------------------------------------------


@dataclass
class TeacherConfig:
    provider: str  # openai (chat-completions endpoint) | local (a model this worker loads)
    model: str  # endpoint model name, or from_pretrained source for local
    base_url: str | None  # endpoint base URL, up to and including /v1
    api_key: str | None = field(default=None, repr=False)  # bearer token; never written to outputs
    timeout_s: float = 120.0  # per request


@dataclass
class DistillConfig:
    teacher: TeacherConfig
    num_prompts: int  # cap on prompts used (the first ones of the input)
    n_samples: int  # best-of-N candidates per prompt
    temperature: float  # teacher sampling temperature
    max_new_tokens: int  # longest teacher completion
    training_steps: int  # optimizer steps
    batch_size: int  # curated prompts per step
    learning_rate: float  # AdamW peak learning rate (linear warmup, linear decay)
    lora_rank: int  # adapter rank; alpha = 2 × rank
    bond_beta: float  # weight of the preference term
    bond_gamma: float  # weight of the KL-to-reference term
    max_seq_length: int  # prompt + completion tokens seen by the student
    save_steps: int  # training steps between checkpoints
    export_gguf: bool  # write GGUF files of the merged student
    quantization_types: list[str]  # one GGUF file per type
    seed: int  # LoRA init, data order and local sampling

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> DistillConfig:
        teacher = f.section(spec, "teacher")
        provider = f.get_str(teacher, "provider", "", choices=PROVIDERS, where="teacher.")
        if not provider:
            raise InvalidConfig("teacher.provider is required (openai or local)", param="teacher.provider")
        model = f.get_str(teacher, "model", "", where="teacher.")
        if not model:
            raise InvalidConfig("teacher.model is required", param="teacher.model")
        base_url = (
            f.get_str(teacher, "base_url", OPENAI_BASE_URL, where="teacher.")
            if provider == "openai"
            else None
        )
        if base_url is not None:
            egress.check_teacher_url(base_url)
        export_gguf = f.get_bool(spec, "export_gguf", False)
        types = f.get_str_list(spec, "quantization_types", ["q8_0"])
        return cls(
            teacher=TeacherConfig(
                provider=provider,
                model=model,
                base_url=base_url.rstrip("/") if base_url else None,
                api_key=teacher.get("api_key") or None,
                timeout_s=f.get_float(
                    teacher, "timeout_s", 120.0, minimum=1.0, maximum=3600.0, where="teacher."
                ),
            ),
            num_prompts=f.get_int(spec, "num_prompts", 500, minimum=1, maximum=100_000),
            n_samples=f.get_int(spec, "n_samples", 4, minimum=1, maximum=64),
            temperature=f.get_float(spec, "temperature", 0.8, minimum=0.0, maximum=2.0),
            max_new_tokens=f.get_int(spec, "max_new_tokens", 128, minimum=1, maximum=4096),
            training_steps=f.get_int(spec, "training_steps", 100, minimum=1, maximum=1_000_000),
            batch_size=f.get_int(spec, "batch_size", 4, minimum=1, maximum=1024),
            learning_rate=f.get_float(
                spec, "learning_rate", 2e-4, minimum=0.0, maximum=1.0, exclusive_minimum=True
            ),
            lora_rank=f.get_int(spec, "lora_rank", 16, minimum=1, maximum=1024),
            bond_beta=f.get_float(spec, "bond_beta", 0.5, minimum=0.0, maximum=10.0),
            bond_gamma=f.get_float(spec, "bond_gamma", 0.1, minimum=0.0, maximum=10.0),
            max_seq_length=f.get_int(spec, "max_seq_length", 1024, minimum=8, maximum=131072),
            save_steps=f.get_int(spec, "save_steps", 50, minimum=1),
            export_gguf=export_gguf,
            # Checked now, not at export: an unsupported type must fail before the teacher is paid.
            quantization_types=validate_quantization_types(types) if export_gguf else [],
            seed=f.get_int(spec, "seed", 0, minimum=0),
        )

    def public(self) -> dict[str, Any]:
        """The config as written to outputs: everything but the API key."""
        data = asdict(self)
        data["teacher"].pop("api_key", None)
        return data


# --- the job ---------------------------------------------------------------------------------------


def run(ctx: JobContext) -> dict[str, Any]:
    config = DistillConfig.from_spec(ctx.spec)
    prompts = _read_prompts(ctx, config.num_prompts)
    checkpoint = _load_checkpoint(ctx.resume_checkpoint) if ctx.resume_checkpoint else None
    meters = (
        checkpoint["meters"]
        if checkpoint
        else {**TeacherMeters.zero(), "compute_seconds": 0.0, "tokens_processed": 0}
    )
    samples: list[dict[str, Any]] = checkpoint["samples"] if checkpoint else []

    def progress(training_step: int = 0) -> dict[str, Any]:
        return {
            "prompts_done": len(samples),
            "prompts_total": len(prompts),
            "training_step": training_step,
            "total_steps": config.training_steps,
            "teacher_tokens": meters["teacher_prompt_tokens"] + meters["teacher_completion_tokens"],
            "gpu_seconds": round(meters["compute_seconds"], 3),
        }

    # --- initializing ------------------------------------------------------------------------------
    ctx.set_phase("initializing", progress())
    torch.manual_seed(config.seed)
    # The frozen base in 16-bit on CUDA (bf16 where native, else fp16 with loss scaling); the adapter
    # stays fp32 (peft keeps adapter weights in fp32) and the step runs under autocast.
    half = half_dtype(ctx.device)
    base_student, tokenizer = load_source_model(ctx, half or torch.float32)
    base_student.config.use_cache = False
    scaler = torch.amp.GradScaler("cuda", enabled=half == torch.float16)

    # --- data_generation: n candidates per prompt ------------------------------------------------------
    ctx.set_phase("data_generation", progress())
    if len(samples) < len(prompts):
        teacher = _make_teacher(config, ctx.device)
        ctx.log(
            f"sampling {config.n_samples} candidates for {len(prompts) - len(samples)} prompts from {teacher}"
        )
        for prompt in prompts[len(samples) :]:
            ctx.check_stop()
            started = time.perf_counter()
            candidates = teacher.sample(prompt, config.n_samples, config.temperature, config.max_new_tokens)
            if isinstance(teacher, LocalTeacher):
                meters["compute_seconds"] += time.perf_counter() - started
            for key, value in teacher.take_meters().items():
                meters[key] += value
            samples.append({"prompt": prompt, "candidates": [asdict(c) for c in candidates]})
            ctx.set_phase("data_generation", progress())
            if len(samples) % GENERATION_CHECKPOINT_EVERY == 0 or len(samples) == len(prompts):
                _save_checkpoint(
                    ctx,
                    f"generation-{len(samples)}",
                    0,
                    {"samples": samples, "meters": meters, "training": None},
                )
        teacher.close()
        del teacher
        _free_memory()

    # --- curation: score, keep best and worst ---------------------------------------------------------
    ctx.set_phase("curation", progress())
    curated, curation_method = curate(samples)
    examples = [_student_examples(item, tokenizer, config.max_seq_length) for item in curated]
    # A prompt longer than max_seq_length leaves no completion token to learn from: drop it.
    kept = [i for i, example in enumerate(examples) if example["best"].trained_tokens > 0]
    curated, examples = [curated[i] for i in kept], [examples[i] for i in kept]
    for item, example in zip(curated, examples, strict=True):
        if example["worst"] is not None and example["worst"].trained_tokens == 0:
            item["worst"], example["worst"] = None, None
    if not curated:
        raise InvalidDataset(
            "no prompt has a usable teacher sample (non-empty, and within max_seq_length with its prompt)",
            param="prompts",
        )
    pairs_kept = sum(1 for item in curated if item["worst"] is not None)
    ctx.log(f"curated {len(curated)} prompts by {curation_method}; {pairs_kept} preference pairs")
    ctx.event("curated", {"prompts": len(curated), "pairs": pairs_kept, "score": curation_method})

    # --- training: LoRA student, BOND-style objective --------------------------------------------------
    torch.manual_seed(config.seed)  # the same adapter initialisation on every attempt
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=2 * config.lora_rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    student = get_peft_model(base_student, lora)
    fuse_lora_adds(student)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor("linear", min(10, config.training_steps // 10), config.training_steps)
    )
    start_step = 0
    training_state = checkpoint.get("training") if checkpoint else None
    if training_state is not None:
        student.load_state_dict(training_state["adapter"], strict=False)
        optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        start_step = training_state["step"]
        ctx.log(f"resumed training at step {start_step}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    ctx.set_phase("training", progress(start_step))
    student.train()
    components: dict[str, float] = {}
    loss_value = float("nan")
    for step in range(start_step, config.training_steps):
        ctx.check_stop()
        started = time.perf_counter()
        batch = [examples[i] for i in _batch_indices(step, config.batch_size, len(examples), config.seed)]

        lr = optimizer.param_groups[0]["lr"]  # this step's rate (the scheduler moves on after it)
        with torch.autocast("cuda", dtype=half or torch.bfloat16, enabled=half is not None):
            loss, components = bond_loss(
                student, batch, pad_id, config.bond_beta, config.bond_gamma, ctx.device
            )
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        elapsed = time.perf_counter() - started
        meters["compute_seconds"] += elapsed
        loss_value = float(loss.detach())
        tokens = sum(
            len(e["best"].input_ids) + (len(e["worst"].input_ids) if e["worst"] else 0) for e in batch
        )
        meters["tokens_processed"] += tokens
        ctx.metric(
            {
                "step": step + 1,
                "ts": time.time(),
                "phase": "train",
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm,
                "throughput": tokens / elapsed,
                "tokens": meters["tokens_processed"],
            }
        )
        ctx.log(
            f"step {step + 1}/{config.training_steps} · loss {loss_value:.4f} · "
            + " · ".join(f"{k} {v:.4f}" for k, v in components.items())
        )
        ctx.set_phase("training", {**progress(step + 1), "current_loss": loss_value})
        if (step + 1) % config.save_steps == 0 and step + 1 < config.training_steps:
            adapter_state = {k: v for k, v in student.state_dict().items() if "lora_" in k}
            _save_checkpoint(
                ctx,
                f"checkpoint-{step + 1}",
                step + 1,
                {
                    "samples": samples,
                    "meters": meters,
                    "training": {
                        "step": step + 1,
                        "adapter": adapter_state,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                    },
                },
            )
            _publish_adapter(ctx, student, tokenizer, step + 1)

    # --- export: adapter, config, curated data, GGUF -----------------------------------------------------
    ctx.set_phase("export", progress(config.training_steps))
    output_name = str(ctx.spec.get("output_name") or f"{ctx.job_id}-student")
    out_dir = Path(ctx.workdir) / "output"
    student.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's model-card stub says nothing of this job
    (out_dir / "train_config.json").write_text(
        json.dumps(
            {
                "job_type": "distill",
                "student": ctx.spec.get("base_model"),
                **config.public(),
                "curation_score": curation_method,
                "objective": "bond: nll(best) + beta*pref + gamma*kl(ref)",
                "lora": {
                    "r": config.lora_rank,
                    "alpha": 2 * config.lora_rank,
                    "target_modules": "all-linear",
                },
            },
            indent=2,
        )
    )
    with open(out_dir / "curated_pairs.jsonl", "w", encoding="utf-8") as handle:
        for item in curated:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    ctx.upload_dir(out_dir)

    gguf_files: dict[str, dict[str, Any]] = {}
    if config.export_gguf:
        merged = cast(PreTrainedModel, student.merge_and_unload())
        for quantization in config.quantization_types:
            ctx.check_stop()
            started = time.perf_counter()
            info = write_gguf(
                merged,
                tokenizer,
                out_dir / "gguf" / f"model-{quantization}.gguf",
                quantization,
                name=output_name,
            )
            meters["compute_seconds"] += time.perf_counter() - started
            ctx.upload_output(info.path)
            gguf_files[quantization] = {"name": info.path.name, "size_bytes": info.size_bytes}
            ctx.log(f"wrote {info.path.name} ({info.size_bytes / 1e6:.1f} MB, tensors {info.tensor_types})")
            if info.dropped_token_ids:
                ctx.log(
                    f"tokenizer ids {info.dropped_token_ids} have no embedding row and are not in the GGUF",
                    stream="stderr",
                )

    return {
        "prompts_total": len(prompts),
        "prompts_used": len(curated),
        "samples_generated": sum(len(s["candidates"]) for s in samples),
        "pairs_kept": pairs_kept,
        "curation_score": curation_method,
        "loss_final": loss_value,
        "loss_components_final": components,
        "steps": config.training_steps,
        "params_trainable": sum(p.numel() for p in trainable),
        "teacher_prompt_tokens": meters["teacher_prompt_tokens"],
        "teacher_completion_tokens": meters["teacher_completion_tokens"],
        "teacher_tokens": meters["teacher_prompt_tokens"] + meters["teacher_completion_tokens"],
        "teacher_requests": meters["teacher_requests"],
        "tokens_processed": meters["tokens_processed"],
        "gpu_seconds": round(meters["compute_seconds"], 3),
        "adapter": {
            "name": output_name,
            "size_bytes": (out_dir / "adapter_model.safetensors").stat().st_size,
        },
        "gguf": gguf_files,
    }


# --- curation ----------------------------------------------------------------------------------------


def curate(samples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Per prompt: the best and worst candidate (worst None when they tie), and the scoring used."""
    every = [c for s in samples for c in s["candidates"] if c["text"].strip()]
    use_logprob = bool(every) and all(c["mean_logprob"] is not None for c in every)
    method = "teacher_logprob" if use_logprob else "distinct_bigrams"
    curated = []
    for sample in samples:
        scored = [
            {
                "text": c["text"],
                "score": c["mean_logprob"] if use_logprob else distinct_bigram_ratio(c["text"]),
                "complete": c["finish_reason"] != "length",
            }
            for c in sample["candidates"]
            if c["text"].strip()
        ]
        if not scored:
            continue
        # Complete answers first, then by score.
        ranked = sorted(scored, key=lambda c: (c["complete"], c["score"]), reverse=True)
        best, worst = ranked[0], ranked[-1]
        distinct = (best["complete"], best["score"]) != (worst["complete"], worst["score"])
        curated.append({"prompt": sample["prompt"], "best": best, "worst": worst if distinct else None})
    return curated, method


# --- the objective ------------------------------------------------------------------------------------


def bond_loss(
    student: PeftModel,
    batch: list[dict[str, Any]],
    pad_id: int,
    beta: float,
    gamma: float,
    device: str,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective in the module docstring, for a batch of curated examples `{best, worst|None}`."""
    rows = [i for i, e in enumerate(batch) if e["worst"] is not None]  # prompts with a preference pair
    use_pairs = bool(rows) and beta > 0

    def forward(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """At every next-token position of the collated examples (a grid, 0 where unlabelled): the
        student's log-prob of the label, the reference's, and KL(π_θ ‖ π_ref); and the label mask.
        The reference is the student without its adapter."""
        inputs = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
        targets = inputs["labels"][:, 1:]
        mask = targets != -100
        policy, head = hidden_and_head(student, inputs["input_ids"], inputs["attention_mask"])
        with torch.no_grad(), student.disable_adapter():
            reference, _ = hidden_and_head(student, inputs["input_ids"], inputs["attention_mask"])
        stats = _token_stats(head, policy[:, :-1][mask], reference[:, :-1][mask], targets[mask])
        logp, ref_logp, kl = (torch.zeros(mask.shape, device=s.device).masked_scatter(mask, s) for s in stats)
        return logp, ref_logp, kl, mask

    logp_best, ref_logp_best, kl_best, mask_best = forward([e["best"] for e in batch])
    distill = -(logp_best.sum() / mask_best.sum())
    kl_sum, kl_count = kl_best.sum(), mask_best.sum()

    preference = torch.zeros((), device=logp_best.device)
    if use_pairs:
        logp_worst, ref_logp_worst, kl_worst, mask_worst = forward([batch[i]["worst"] for i in rows])
        # Length-normalised log-ratio of policy to reference, best minus worst.
        margin = _mean_per_row(logp_best[rows] - ref_logp_best[rows], mask_best[rows]) - _mean_per_row(
            logp_worst - ref_logp_worst, mask_worst
        )
        preference = -F.logsigmoid(margin).mean()
        kl_sum, kl_count = kl_sum + kl_worst.sum(), kl_count + mask_worst.sum()
    kl = kl_sum / kl_count

    loss = distill + beta * preference + gamma * kl
    return loss, {
        "distill": float(distill.detach()),
        "preference": float(preference.detach()),
        "kl": float(kl.detach()),
    }


def _token_stats(
    head: torch.nn.Module, policy: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position (hidden states of labelled positions in, one row each): log π_θ(target),
    log π_ref(target) and KL(π_θ ‖ π_ref) over the whole vocabulary. The head runs a chunk of
    positions at a time under checkpointing, so no chunk's full-vocabulary fp32 tensors outlive it
    (in backward they are recomputed, a chunk at a time)."""
    rows = chunk_rows(head, policy)
    chunks = [
        checkpoint(
            _chunk_stats,
            head,
            policy[start : start + rows],
            reference[start : start + rows],
            targets[start : start + rows],
            use_reentrant=False,
        )
        for start in range(0, targets.shape[0], rows)
    ]
    logp, ref_logp, kl = (torch.cat(parts) for parts in zip(*chunks, strict=True))
    return logp, ref_logp, kl


def _chunk_stats(
    head: torch.nn.Module, policy: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    policy_logp = torch.log_softmax(head(policy).float(), dim=-1)
    with torch.no_grad():
        reference_logp = torch.log_softmax(head(reference).float(), dim=-1)
    index = targets.unsqueeze(1)
    kl = (policy_logp.exp() * (policy_logp - reference_logp)).sum(-1)
    return policy_logp.gather(1, index).squeeze(1), reference_logp.gather(1, index).squeeze(1), kl


def _mean_per_row(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values.sum(-1) / mask.sum(-1).clamp(min=1)


def _student_examples(
    item: dict[str, Any], tokenizer: PreTrainedTokenizerBase, max_len: int
) -> dict[str, Any]:
    """The student sees prompt → completion as its own chat turn (or `prompt\\n` + completion without a
    chat template); only completion tokens are scored."""

    def encode(completion: str) -> Example:
        if getattr(tokenizer, "chat_template", None):
            record = {
                "messages": [
                    {"role": "user", "content": item["prompt"]},
                    {"role": "assistant", "content": completion},
                ]
            }
            return tokenize_record(record, "chat", tokenizer, max_len)
        return tokenize_record(
            {"prompt": item["prompt"] + "\n", "completion": completion},
            "prompt_completion",
            tokenizer,
            max_len,
        )

    worst = item["worst"]
    return {"best": encode(item["best"]["text"]), "worst": encode(worst["text"]) if worst else None}


# --- teachers ----------------------------------------------------------------------------------------


class TeacherMeters:
    """What a teacher has cost since the last `take_meters()`: tokens by the teacher's count, requests."""

    @staticmethod
    def zero() -> dict[str, int]:
        return {"teacher_prompt_tokens": 0, "teacher_completion_tokens": 0, "teacher_requests": 0}

    def __init__(self) -> None:
        self._meters = self.zero()

    def take_meters(self) -> dict[str, int]:
        meters, self._meters = self._meters, self.zero()
        return meters


@dataclass
class Candidate:
    text: str
    finish_reason: str  # "stop" or "length" (cut off at max_new_tokens)
    mean_logprob: float | None  # teacher's mean token log-prob of the text, when known
    tokens: int


class OpenAITeacher(TeacherMeters):
    """An OpenAI-compatible `POST {base_url}/chat/completions`, asking for `n` choices and `logprobs`."""

    def __init__(self, config: TeacherConfig) -> None:
        super().__init__()
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.model = config.model
        self.client = egress.teacher_client(config.base_url or OPENAI_BASE_URL, headers, config.timeout_s)
        self.logprobs_supported = True

    def __str__(self) -> str:
        return f"{self.model} at {self.client.base_url}"

    def sample(self, prompt: str, n: int, temperature: float, max_new_tokens: int) -> list[Candidate]:
        candidates: list[Candidate] = []
        # Some servers ignore `n` and answer one choice: ask again for the rest (at most n requests).
        for _ in range(n):
            body = {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "n": n - len(candidates),
                "temperature": temperature,
                "max_tokens": max_new_tokens,
            }
            if self.logprobs_supported:
                body["logprobs"] = True
            candidates += [self._candidate(choice) for choice in self._post(body)["choices"]]
            if len(candidates) >= n:
                break
        return candidates[:n]

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        delay, failure = TEACHER_BACKOFF_S, ""
        for attempt in range(1, TEACHER_ATTEMPTS + 1):
            try:
                response = self.client.post("/chat/completions", json=body)
            except httpx.TransportError as err:
                failure = egress.describe_transport_error(err)
            else:
                if response.status_code == 400 and body.get("logprobs"):
                    # An endpoint without logprobs support: curation falls back to the heuristic.
                    self.logprobs_supported = False
                    body = {k: v for k, v in body.items() if k != "logprobs"}
                    continue
                if response.status_code in (401, 403, 404):
                    raise InvalidConfig(
                        f"teacher endpoint refused the request ({egress.describe_response(response)})",
                        param="teacher",
                    )
                if response.status_code == 200:
                    data = response.json()
                    usage = data.get("usage") or {}
                    self._meters["teacher_prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
                    self._meters["teacher_completion_tokens"] += int(usage.get("completion_tokens") or 0)
                    self._meters["teacher_requests"] += 1
                    return data
                failure = egress.describe_response(response)
                if response.status_code != 429 and response.status_code < 500:
                    raise InvalidConfig(f"teacher endpoint rejected the request: {failure}", param="teacher")
            if attempt < TEACHER_ATTEMPTS:
                time.sleep(delay)
                delay *= 2
        raise TeacherError(f"teacher endpoint failed {TEACHER_ATTEMPTS} times; last: {failure}")

    @staticmethod
    def _candidate(choice: dict[str, Any]) -> Candidate:
        text = (choice.get("message") or {}).get("content") or ""
        token_logprobs = [t["logprob"] for t in ((choice.get("logprobs") or {}).get("content") or [])]
        return Candidate(
            text=text,
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            mean_logprob=sum(token_logprobs) / len(token_logprobs) if token_logprobs else None,
            tokens=len(token_logprobs),
        )

    def close(self) -> None:
        self.client.close()


class LocalTeacher(TeacherMeters):
    """A causal LM loaded on this worker: sampled with `generate`, scored by its own log-likelihood."""

    def __init__(self, config: TeacherConfig, device: str, seed: int) -> None:
        super().__init__()
        self.name = config.model
        # 16-bit on CUDA, 4-bit where bitsandbytes is installed: a teacher only samples and scores, and a
        # large one then fits beside the student. fp32 on CPU.
        source = checked_source(config.model, param="teacher.model")
        self.model, self.tokenizer = load_model_and_tokenizer(
            source,
            device=device,
            dtype=load_dtype(device),
            quantize_4bit=device.startswith("cuda") and bitsandbytes_available(),
        )
        self.model.eval()
        self.seed = seed

    def __str__(self) -> str:
        return f"local model {self.name}"

    @torch.no_grad()
    def sample(self, prompt: str, n: int, temperature: float, max_new_tokens: int) -> list[Candidate]:
        tokenizer, device = self.tokenizer, next(self.model.parameters()).device
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            # The template writes its own special tokens.
            prompt_ids = list(tokenizer(str(rendered), add_special_tokens=False)["input_ids"])
        else:
            prompt_ids = list(tokenizer(prompt + "\n")["input_ids"])
        # Seeded by (seed, prompt): a retried or resumed job samples the same candidates.
        torch.manual_seed(self.seed + zlib.crc32(prompt.encode("utf-8")))
        prompt_tensor = torch.tensor([prompt_ids], device=device)
        # Temperature 0 is greedy: every sample would be the same one (and generate refuses
        # num_return_sequences > 1 without sampling), so it answers one candidate.
        greedy = temperature == 0
        output = self.model.generate(  # type: ignore[operator]  # GenerationMixin, unseen by the stubs
            input_ids=prompt_tensor,
            attention_mask=torch.ones_like(prompt_tensor),
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_k=None if greedy else 0,
            top_p=None if greedy else 1.0,
            num_return_sequences=1 if greedy else n,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
        eos = tokenizer.eos_token_id
        candidates = []
        for row in output[:, len(prompt_ids) :].tolist():
            stopped = eos in row
            completion = row[: row.index(eos) + 1] if stopped else row
            text = str(tokenizer.decode(completion, skip_special_tokens=True))
            candidates.append(
                Candidate(
                    text=text,
                    finish_reason="stop" if stopped else "length",
                    mean_logprob=self._mean_logprob(prompt_ids, completion),
                    tokens=len(completion),
                )
            )
            self._meters["teacher_completion_tokens"] += len(completion)
        self._meters["teacher_prompt_tokens"] += len(prompt_ids)
        self._meters["teacher_requests"] += 1
        return candidates

    def _mean_logprob(self, prompt_ids: list[int], completion: list[int]) -> float | None:
        """Mean log-prob of the completion tokens under the teacher at temperature 1."""
        if not completion:
            return None
        device = next(self.model.parameters()).device
        ids = torch.tensor([prompt_ids + completion], device=device)
        labels = torch.tensor([[-100] * len(prompt_ids) + completion], device=device)
        nll, count = causal_lm_loss_sum(self.model, ids, labels)  # no full-vocabulary logits
        return -float(nll) / count

    def close(self) -> None:
        del self.model


def _make_teacher(config: DistillConfig, device: str) -> OpenAITeacher | LocalTeacher:
    if config.teacher.provider == "openai":
        return OpenAITeacher(config.teacher)
    return LocalTeacher(config.teacher, device, config.seed)


# --- inputs, checkpoints ----------------------------------------------------------------------------


def _read_prompts(ctx: JobContext, limit: int) -> list[str]:
    path = ctx.inputs.get("prompts") or ctx.inputs.get("dataset")
    if path is None:
        raise InvalidConfig('a distill job needs a prompts input (JSONL of {"prompt": ...})', param="prompts")
    try:
        records = read_jsonl(path)
    except ValueError as err:
        raise InvalidDataset(str(err), param="prompts") from None
    prompts = []
    for record in records[:limit]:
        prompt = _prompt_of(record)
        if prompt is None:
            raise InvalidDataset(
                f'{Path(path).name} line {record["__line__"]}: expected a non-empty "prompt", "text" '
                'or a "messages" list with a user message',
                param="prompts",
            )
        prompts.append(prompt)
    return prompts


def _prompt_of(record: dict[str, Any]) -> str | None:
    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return record["prompt"]
    if isinstance(record.get("messages"), list):
        users = [
            m.get("content") for m in record["messages"] if isinstance(m, dict) and m.get("role") == "user"
        ]
        if users and isinstance(users[-1], str) and users[-1].strip():
            return users[-1]
    if isinstance(record.get("text"), str) and record["text"].strip():
        return record["text"]
    return None


def _batch_indices(step: int, batch_size: int, count: int, seed: int) -> list[int]:
    """Examples of `step`: positions step·b … step·b + b − 1 of the stream of seeded epoch orders."""
    orders: dict[int, list[int]] = {}
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, count)
        if epoch not in orders:
            orders[epoch] = epoch_order(count, seed, epoch)
        indices.append(orders[epoch][offset])
    return indices


def _publish_adapter(
    ctx: JobContext, student: PeftModel, tokenizer: PreTrainedTokenizerBase, step: int
) -> None:
    """Publishes the adapter as of a checkpoint as the job's outputs, so that a job cancelled or failed
    after it keeps a usable adapter (seed 000: "partial artifacts are kept"). The export of a job
    that finishes replaces these files under the same names."""
    partial = Path(ctx.workdir) / "partial-adapter"
    student.save_pretrained(str(partial))
    tokenizer.save_pretrained(partial)
    (partial / "README.md").unlink(missing_ok=True)
    ctx.upload_dir(partial)
    ctx.log(f"published the adapter of step {step} as the job's outputs")


def _save_checkpoint(ctx: JobContext, name: str, step: int, state: dict[str, Any]) -> None:
    path = Path(ctx.workdir) / "distill-checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, **state}, path)
    ctx.save_checkpoint(name, step, path)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InvalidConfig(f"resume checkpoint is not a distill checkpoint ({state.get('format')!r})")
    return state


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
