"""Fine-tuning a causal LM on a JSONL dataset: LoRA, QLoRA (4-bit base, CUDA only) or full.

Read top to bottom: the config and its defaults → `resolve_config` (refuses what this worker cannot
run, before any work) → `Finetune.setup` (model → adapter → optimizer → data → scheduler → resume)
→ `Finetune.train` (one loop) → `save_outputs` → the result. `run(ctx)` strings them together.

Batching: the training split is read as one stream of examples, each epoch in its own seeded
permutation; an optimizer step takes `batch_size × gradient_accumulation_steps` examples from it.
The stream position (epoch, index) is therefore exact, and a checkpoint resumes at the very example
it stopped at. A step that runs past the end of an epoch tops up from the next epoch's order, so
every step has the same size. Within a step the examples are grouped by length into micro-batches,
each packed several examples to a row (`data.pack`), and the loss is fused with the LM head
(`modeling.causal_lm_loss_sum`): neither changes what a step computes, only how fast and in how
much memory.

Distributed (`distributed.enabled`, one node): `run` hands the job to `ddp_entry.launch`, which starts
torchrun with one process per GPU (2 on CPU) and forwards rank 0's reports. Every rank runs this
same loop on a `Ranks` handle: each draws the whole global step from the stream (so the position
stays exact and the same on every rank) and trains on its share of every micro-batch, with the
model in DistributedDataParallel. `batch_size` stays the global micro-batch, so a run, its
checkpoints and its result do not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunery_worker import data as datalib
from tunery_worker.context import JobContext, JobStopped
from tunery_worker.errors import InvalidConfig, InvalidDataset
from tunery_worker.jobs.model_source import check_stackable, merge_adapter, model_source, stack_adapters
from tunery_worker.modeling import (
    CausalLMLoss,
    apply_fused_kernels,
    bitsandbytes_available,
    compile_backbone,
    compile_enabled,
    count_params,
    fuse_lora_adds,
    half_dtype,
    load_model_and_tokenizer,
    mean_token_loss,
    memory_gb,
)

if TYPE_CHECKING:
    from tunery_worker.jobs.ddp_entry import Ranks

CHECKPOINT_FORMAT = "tunery-finetune-checkpoint/1"
MAX_GRAD_NORM = 1.0  # gradients are clipped to this total norm; the reported grad_norm is before clipping
PPL_SAMPLE = 64  # examples used for perplexity when there is no eval split
METHODS = ("lora", "qlora", "full")
CPU_NPROC = 2  # processes a distributed run starts on a CPU worker (gloo), unless nproc_per_node says


# --- config: every default in one place --------------------------------------------------------------


@dataclass
class LoraSettings:
    r: int = 16  # adapter rank
    alpha: float = 32  # scale = alpha / r
    dropout: float = 0.05  # dropout on the adapter's input
    target_modules: list[str] | str = "all-linear"  # module names, or every linear layer but the LM head
    bias: str = "none"  # which biases train: none | all | lora_only


@dataclass
class TrainingSettings:
    num_epochs: float = 3  # passes over the training split; used when max_steps is -1
    max_steps: int = -1  # optimizer steps; -1 derives them from num_epochs
    batch_size: int = 4  # examples per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 2e-4  # peak learning rate, reached after warmup
    warmup_steps: int = 0  # linear warmup from 0
    lr_scheduler: str = "linear"  # decay after warmup: linear | cosine | constant
    weight_decay: float = 0.0  # AdamW decay on matrices (never on biases and norms)
    max_seq_length: int = 2048  # longer examples are truncated
    logging_steps: int = 10  # steps between metric points and log lines
    save_steps: int = 500  # steps between checkpoints
    eval_steps: int = 0  # steps between evaluations; 0 evaluates at the end only
    eval_split: float = 0.0  # fraction of the dataset held out for evaluation
    use_gradient_checkpointing: bool = False  # recompute activations: less memory, ~30% slower
    bf16: bool = True  # 16-bit autocast on CUDA: bf16 where native, else fp16 with loss scaling; not on CPU
    seed: int = 42  # data order, dropout and adapter initialisation
    train_on_inputs: bool = False  # also train on prompt / non-assistant tokens


@dataclass
class DistributedSettings:
    enabled: bool = False  # data-parallel training with torchrun on this worker
    num_nodes: int = 1  # > 1: a gang of that many workers, one torchrun node each (the server schedules it)
    nproc_per_node: int | None = None  # processes; None: one per visible CUDA device, CPU_NPROC on CPU
    # Set for a gang (num_nodes > 1) from the worker's place in it, never from the spec.
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    # How long a rank waits in a collective before the group fails. Rank 0 alone evaluates,
    # checkpoints and uploads while the others wait at the next step; torch's 10-minute default
    # killed runs whose checkpoint upload or evaluation took longer.
    timeout_s: float = 4 * 3600.0


@dataclass
class FinetuneConfig:
    method: str  # lora | qlora | full
    base_model: str  # what from_pretrained takes: a hub id or a local directory
    base_model_name: str
    output_name: str
    device: str
    dataset_format: str | None = None  # text | prompt_completion | chat; None detects it
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    # Resolved here, not asked for: the autocast type, bf16 only where the hardware computes it.
    use_bf16: bool = False
    use_fp16: bool = False  # CUDA without native bf16 (T4, V100): fp16 autocast with a GradScaler

    def to_dict(self) -> dict[str, Any]:
        config = dataclasses.asdict(self)
        for placement in ("node_rank", "master_addr", "master_port"):  # this attempt's, not the run's
            config["distributed"].pop(placement, None)
        return config


# The protocol names LoRA settings `alpha`/`dropout`; the public API says `lora_alpha`/`lora_dropout`.
_LORA_ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout"}


def resolve_config(ctx: JobContext) -> FinetuneConfig:
    """Merge the spec over the defaults and refuse, before any work, what this worker cannot run."""
    spec = ctx.spec
    method = spec.get("method", "lora")
    if method not in METHODS:
        raise InvalidConfig(f"unknown method {method!r}: expected one of {list(METHODS)}", param="method")
    if method == "qlora" and not (ctx.device.startswith("cuda") and bitsandbytes_available()):
        raise InvalidConfig(
            f"method 'qlora' needs a CUDA GPU with bitsandbytes; this worker runs on {ctx.device}. "
            "Use method 'lora' or run a GPU worker",
            param="method",
        )
    distributed = _resolve_distributed(spec.get("distributed"), ctx.device, ctx.gang)

    base = spec.get("base_model") or {}
    source = model_source(ctx)
    if "dataset" not in ctx.inputs:
        raise InvalidConfig("finetune needs a 'dataset' input", param="dataset")

    lora_spec = {_LORA_ALIASES.get(k, k): v for k, v in (spec.get("lora") or {}).items()}
    training_spec = dict(spec.get("training") or {})
    training_spec.setdefault("seed", spec.get("seed", TrainingSettings.seed))
    cfg = FinetuneConfig(
        method=method,
        base_model=str(source),
        base_model_name=str(base.get("name") or source),
        output_name=str(spec.get("output_name") or f"{ctx.job_id}-{method}"),
        device=ctx.device,
        dataset_format=spec.get("dataset_format"),
        lora=_settings(LoraSettings, lora_spec, "lora"),
        training=_settings(TrainingSettings, training_spec, "training"),
        distributed=distributed,
    )
    _check_ranges(cfg)
    half = half_dtype(ctx.device) if cfg.training.bf16 else None
    cfg.use_bf16, cfg.use_fp16 = half == torch.bfloat16, half == torch.float16
    return cfg


def _settings(cls: Any, given: dict[str, Any], section: str) -> Any:
    """Build a settings dataclass; keys it does not know (e.g. `task_type`) are ignored, not fatal."""
    known = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in given.items() if k in known and v is not None}
    try:
        return cls(**values)
    except TypeError as err:
        raise InvalidConfig(f"{section}: {err}", param=section) from None


def _resolve_distributed(given: Any, device: str, gang: dict[str, Any] | None = None) -> DistributedSettings:
    """`distributed` with `nproc_per_node` resolved to a number (1 when not distributed)."""
    if not isinstance(given, dict):  # the public API's plain `distributed: true|false`
        given = {"enabled": bool(given)}
    given = {k: v for k, v in given.items() if k not in ("node_rank", "master_addr", "master_port")}
    d = _settings(DistributedSettings, given, "distributed")
    if not d.enabled:
        return DistributedSettings(enabled=False, num_nodes=1, nproc_per_node=1, timeout_s=d.timeout_s)
    if not isinstance(d.num_nodes, int) or d.num_nodes < 1:
        raise InvalidConfig("distributed.num_nodes must be an integer ≥ 1", param="distributed")
    if d.num_nodes > 1:
        # A gang: the server started it on num_nodes workers and told this one its place.
        if gang is None or int(gang.get("world", 0)) != d.num_nodes:
            raise InvalidConfig(
                f"num_nodes {d.num_nodes} runs on a gang of {d.num_nodes} workers, which the server "
                "schedules together; this worker was not started as a member of one",
                param="distributed",
            )
        if not isinstance(d.timeout_s, int | float) or d.timeout_s < 60:
            raise InvalidConfig("distributed.timeout_s must be a number of seconds ≥ 60", param="distributed")
        return DistributedSettings(
            enabled=True,
            num_nodes=d.num_nodes,
            nproc_per_node=1,  # one process per node: the worker's device (CPU with gloo, or one GPU)
            timeout_s=float(d.timeout_s),
            node_rank=int(gang["rank"]),
            master_addr=str(gang["master_addr"]),
            master_port=int(gang["master_port"]),
        )
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    nproc = d.nproc_per_node
    if nproc is None:
        nproc = max(1, gpus) if device.startswith("cuda") else CPU_NPROC
    if not isinstance(nproc, int) or nproc < 1:
        raise InvalidConfig("distributed.nproc_per_node must be an integer ≥ 1", param="distributed")
    if device.startswith("cuda") and nproc > gpus:
        raise InvalidConfig(
            f"distributed.nproc_per_node {nproc} exceeds the {gpus} CUDA devices this worker sees",
            param="distributed",
        )
    if not isinstance(d.timeout_s, int | float) or d.timeout_s < 60:
        raise InvalidConfig("distributed.timeout_s must be a number of seconds ≥ 60", param="distributed")
    return DistributedSettings(enabled=True, num_nodes=1, nproc_per_node=nproc, timeout_s=float(d.timeout_s))


def _check_ranges(cfg: FinetuneConfig) -> None:
    t, lora = cfg.training, cfg.lora
    rules = [
        ("training.batch_size", t.batch_size >= 1, "must be ≥ 1"),
        ("training.gradient_accumulation_steps", t.gradient_accumulation_steps >= 1, "must be ≥ 1"),
        ("training.learning_rate", t.learning_rate > 0, "must be > 0"),
        ("training.max_steps", t.max_steps == -1 or t.max_steps >= 1, "must be -1 or ≥ 1"),
        ("training.num_epochs", t.max_steps != -1 or t.num_epochs > 0, "must be > 0"),
        ("training.warmup_steps", t.warmup_steps >= 0, "must be ≥ 0"),
        (
            "training.lr_scheduler",
            t.lr_scheduler in ("linear", "cosine", "constant"),
            "linear|cosine|constant",
        ),
        ("training.max_seq_length", t.max_seq_length >= 2, "must be ≥ 2"),
        ("training.logging_steps", t.logging_steps >= 1, "must be ≥ 1"),
        ("training.save_steps", t.save_steps >= 1, "must be ≥ 1"),
        ("training.eval_steps", t.eval_steps >= 0, "must be ≥ 0"),
        ("training.eval_split", 0 <= t.eval_split < 1, "must be in [0, 1)"),
        ("lora.r", lora.r >= 1, "must be ≥ 1"),
        ("lora.dropout", 0 <= lora.dropout < 1, "must be in [0, 1)"),
        ("lora.bias", lora.bias in ("none", "all", "lora_only"), "none|all|lora_only"),
    ]
    for param, ok, rule in rules:
        if not ok:
            raise InvalidConfig(f"{param} {rule}", param=param)
    nproc = (cfg.distributed.nproc_per_node or 1) * cfg.distributed.num_nodes
    if t.batch_size < nproc:
        raise InvalidConfig(
            f"training.batch_size {t.batch_size} is smaller than the {nproc} distributed processes: "
            "batch_size is the global micro-batch, and every process needs at least one example of it",
            param="training.batch_size",
        )


# --- the run --------------------------------------------------------------------------------------------


def run(ctx: JobContext) -> dict[str, Any]:
    ctx.set_phase("initializing")
    cfg = resolve_config(ctx)
    if (cfg.distributed.nproc_per_node or 1) > 1 or cfg.distributed.num_nodes > 1:
        from tunery_worker.jobs import ddp_entry

        return ddp_entry.launch(ctx, cfg)
    if cfg.distributed.enabled:
        ctx.log(f"distributed training with one process on {cfg.device}: training in this process")
    return train_and_save(ctx, cfg)


def train_and_save(ctx: JobContext, cfg: FinetuneConfig, ranks: Ranks | None = None) -> dict[str, Any]:
    """Setup → train → evaluate → save. Under DDP every rank trains; only rank 0 goes on to the end."""
    job = Finetune(ctx, cfg, ranks)
    try:
        job.setup()
        job.train()
        if not job.is_main:
            return {}
        ctx.set_phase("evaluating")
        job.final_eval()
        ctx.set_phase("saving")
        outputs = job.save_outputs()
        return job.result(outputs)
    finally:
        job.cleanup()


@dataclass
class DataPosition:
    """Where the example stream stands: the next example is `order(epoch)[index]`."""

    epoch: int = 0
    index: int = 0


class Finetune:
    def __init__(self, ctx: JobContext, cfg: FinetuneConfig, ranks: Ranks | None = None) -> None:
        self.ctx, self.cfg = ctx, cfg
        # Under DDP: this process's rank and the collectives; None trains in this process alone.
        self.ranks = ranks
        self.is_main = ranks is None or ranks.rank == 0
        self.world_size = 1 if ranks is None else ranks.world_size
        self.workdir = Path(ctx.workdir) / "finetune"
        self.step = 0
        self.total_steps = 0
        self.position = DataPosition()
        self._order: tuple[int, list[int]] | None = None  # cached (epoch, permutation)
        self.stats: dict[str, Any] = {
            "ppl_baseline": None,
            "tokens_processed": 0,
            "train_seconds": 0.0,
            "loss_last": None,
            "eval_loss_last": None,
        }
        self.last_saved_step = -1
        self.step_lr = 0.0  # the learning rate the last step ran at

    # --- setup: model → adapter → optimizer → data → scheduler → resume --------------------------------

    def setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        self.workdir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.training.seed)
        if cfg.use_fp16:
            ctx.log(f"{cfg.device} has no native bf16: fp16 autocast with loss scaling")
        elif cfg.training.bf16 and not cfg.use_bf16:
            ctx.log(f"bf16 is not available on {cfg.device}; training in float32")

        ctx.set_phase("loading_model")
        self.model, self.tokenizer = self._load_model()
        self.params_before = count_params(self.model)
        # Checkpointing is switched on in the base before peft wraps it (peft's documented order), and the
        # adapter goes on before the optimizer, which must see exactly the trainable parameters.
        self._prepare_for_training()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.params_trainable = count_params(self.model, trainable_only=True)
        self._speed_ups()
        self.optimizer = self._make_optimizer()
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (the scaler is a no-op).
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.use_fp16)
        # What the training step calls: the model's fused token loss, under DDP in a wrapper that
        # averages gradients.
        loss_model = CausalLMLoss(self.model)
        self.net = loss_model if self.ranks is None else self.ranks.wrap(loss_model)

        ctx.set_phase("data_preparation")
        self._prepare_data()
        # The schedule's length depends on the dataset size, so the scheduler comes after the data.
        self.total_steps = self._count_total_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_factor(cfg.training.lr_scheduler, cfg.training.warmup_steps, self.total_steps),
        )

        if ctx.resume_checkpoint is not None:
            self._restore(Path(ctx.resume_checkpoint))
        else:
            # Evaluations are rank 0's alone: it is the one that reports them.
            self.stats["ppl_baseline"] = self._perplexity() if self.is_main else None
            if self.ranks is not None and self.ranks.rank > 0:
                # Identical until here (so every rank built the same adapter); dropout differs per rank.
                seed_everything(rank_seed(cfg.training.seed, 0, self.ranks.rank))
        ctx.log(
            f"{cfg.method} on {cfg.base_model_name}: {self.params_trainable:,} of {self.params_before:,} "
            f"parameters train; {len(self.train_examples)} train / {len(self.eval_examples)} eval examples; "
            f"{self.total_steps} steps on {cfg.device}"
        )

    def _load_model(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The base model; when the job starts from an adapter model, with that adapter merged in
        (save_outputs stacks it under the adapter this run trains)."""
        cfg = self.cfg
        start_adapter = self.ctx.inputs.get("adapter")
        if start_adapter is not None:
            self._check_start_adapter(Path(start_adapter))
        # Weights stay float32 (bf16 runs under autocast, keeping fp32 master weights), except QLoRA,
        # whose frozen base is 4-bit and whose other weights can be bf16 to save memory.
        dtype = torch.bfloat16 if cfg.method == "qlora" and cfg.use_bf16 else torch.float32
        model, tokenizer = load_model_and_tokenizer(
            cfg.base_model,
            device=cfg.device,
            dtype=dtype,
            quantize_4bit=cfg.method == "qlora",
            token=self.ctx.spec.get("hf_token"),  # read here only: the secret never enters the saved config
        )
        if start_adapter is None:
            return model, tokenizer
        return merge_adapter(model, Path(start_adapter)), tokenizer

    def _check_start_adapter(self, start: Path) -> None:
        """Before any training: what save_outputs could not stack fails now, not at the end."""
        if self.cfg.method == "qlora":
            raise InvalidConfig(
                "a QLoRA run cannot start from an adapter model (its 4-bit base cannot take the adapter's "
                "weights): use method lora, or merge the adapter first",
                param="method",
            )
        if self.cfg.method == "full":
            return  # merged in and trained whole: nothing to stack
        check_stackable(json.loads((start / "adapter_config.json").read_text()))
        if self.cfg.lora.bias != "none":
            raise InvalidConfig(
                "a LoRA run that starts from an adapter model trains no bias terms", param="lora.bias"
            )

    def _prepare_for_training(self) -> None:
        cfg, model = self.cfg, self.model
        model.config.use_cache = False  # the KV cache only serves generation and clashes with checkpointing
        if cfg.method == "qlora":
            from peft import prepare_model_for_kbit_training

            # Casts norms to fp32 and enables input grads so checkpointing works through frozen 4-bit layers.
            # Non-reentrant checkpointing: reentrant is deprecated (to become an error) and breaks under DDP.
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.training.use_gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif cfg.training.use_gradient_checkpointing:
            # Non-reentrant checkpointing needs no input grads, so it also works with a frozen base.
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

        if cfg.method == "full":
            for param in model.parameters():
                param.requires_grad_(True)
            self.model = model
            return
        from peft import LoraConfig, get_peft_model

        lora = cfg.lora
        # peft annotates alpha as int and bias as a Literal; both were validated in resolve_config.
        settings: dict[str, Any] = {"lora_alpha": lora.alpha, "bias": lora.bias}
        peft_config = LoraConfig(
            r=lora.r,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
            **settings,
        )
        self.model = get_peft_model(model, peft_config)  # type: ignore[assignment]
        fuse_lora_adds(self.model)

    def _speed_ups(self) -> None:
        """torch.compile when asked for (see compile_enabled), else liger-kernel's fused kernels (CUDA,
        when it is installed): one or the other. Compiling fuses RMSNorm and SwiGLU itself, and dynamo
        cannot trace liger's autograd Functions (an AssertionError in its RMSNorm on an H200, torch
        2.11 with liger-kernel 0.8.5)."""
        if compile_enabled() and compile_backbone(self.model):
            self.ctx.log("torch.compile: the first steps include compiling the model")
            return
        applied = apply_fused_kernels(self.model, self.cfg.device)
        if applied:
            self.ctx.log(applied)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        # Decay matrices only: decaying biases and norm gains just pulls them towards zero for no gain.
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": self.cfg.training.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # fused: one kernel for every parameter's update instead of several per tensor (CPU and CUDA).
        return torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.cfg.training.learning_rate, fused=True
        )

    def _prepare_data(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        try:
            records, fmt = datalib.load_records(self.ctx.inputs["dataset"], cfg.dataset_format)
            dataset = datalib.build_dataset(records, fmt, self.tokenizer, t.max_seq_length, t.train_on_inputs)
            train, evaluation = dataset.examples, []
            if "eval_dataset" in self.ctx.inputs:
                eval_records, _ = datalib.load_records(self.ctx.inputs["eval_dataset"], fmt)
                evaluation = datalib.build_dataset(
                    eval_records, fmt, self.tokenizer, t.max_seq_length, t.train_on_inputs
                ).examples
            elif t.eval_split > 0:
                train, evaluation = datalib.split_train_eval(train, t.eval_split, t.seed)
        except ValueError as err:
            raise InvalidDataset(str(err), param="dataset") from None
        if dataset.dropped:
            self.ctx.log(f"{dataset.dropped} records had nothing to train on within max_seq_length; skipped")
        self.data_format = fmt
        self.train_examples, self.eval_examples = train, evaluation
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _count_total_steps(self) -> int:
        t = self.cfg.training
        if t.max_steps > 0:
            return t.max_steps
        per_step = t.batch_size * t.gradient_accumulation_steps
        return max(1, math.ceil(t.num_epochs * len(self.train_examples) / per_step))

    # --- the training loop --------------------------------------------------------------------------------

    def train(self) -> None:
        cfg, ctx, t = self.cfg, self.ctx, self.cfg.training
        ctx.set_phase("training", self._progress())
        self.net.train()
        try:
            while self.step < self.total_steps:
                # Exactly one stop check per step: a cancel lands within one step.
                self._check_stop()
                started = time.perf_counter()
                loss, grad_norm, tokens = self._train_step()
                elapsed = time.perf_counter() - started
                self.step += 1
                self.stats["train_seconds"] += elapsed
                self.stats["tokens_processed"] += tokens
                self.stats["loss_last"] = loss

                if self.step % t.logging_steps == 0 or self.step in (1, self.total_steps):
                    self._report_step(loss, grad_norm, tokens / max(elapsed, 1e-9))
                if t.eval_steps and self.step % t.eval_steps == 0 and self.step < self.total_steps:
                    self._evaluate()
                if self.step % t.save_steps == 0:
                    self.save_checkpoint()
        except JobStopped:
            # Keep the work done so far: a resumed attempt continues from here.
            if self.step > max(self.last_saved_step, 0):
                try:
                    self.save_checkpoint()
                except Exception as err:  # the lease may already be gone; the stop still wins
                    ctx.log(f"could not save a checkpoint while stopping: {err}", stream="stderr")
            raise
        # The last step is durable too (unless save_steps just saved it): a crash in the final eval or
        # while saving outputs then resumes here instead of redoing up to save_steps - 1 steps.
        if self.step > self.last_saved_step:
            self.save_checkpoint()
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _check_stop(self) -> None:
        if self.ranks is None:
            self.ctx.check_stop()
        elif self.ranks.agree_to_stop(self.is_main and self.ctx.should_stop()):  # rank 0 decides for all
            raise JobStopped(self.ctx.job_id)

    def _train_step(self) -> tuple[float, float, int]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches → (loss, grad norm, tokens)."""
        t = self.cfg.training
        # Every rank draws the whole global step, so the stream position is the same everywhere.
        drawn = self._next_examples(t.batch_size * t.gradient_accumulation_steps)
        # Normalise by the labelled tokens of the whole step, so every token weighs the same no matter
        # how the accumulation window (or the ranks) split them (a per-batch mean over-weights short ones).
        # That also makes the step's gradient independent of which micro-batch an example lands in, so
        # the step's examples are grouped by length: micro-batches of similar lengths pack tightly.
        labelled = sum(e.trained_tokens for e in drawn)
        tokens = sum(len(e.input_ids) for e in drawn)
        by_length = sorted(drawn, key=lambda e: len(e.input_ids), reverse=True)
        micro_batches = [by_length[i : i + t.batch_size] for i in range(0, len(by_length), t.batch_size)]
        lr = self._lr()  # the rate this step runs at (the scheduler moves on after it)
        device = self.cfg.device
        loss_total = 0.0
        for i, examples in enumerate(micro_batches):
            if self.ranks is not None:
                examples = self.ranks.shard(examples)
            batch = {k: v.to(device) for k, v in datalib.pack(examples, self.pad_id).items()}
            last = i == len(micro_batches) - 1
            # DDP averages gradients over ranks at the last micro-batch's backward; scaling each rank's
            # sum by the world size turns that average into the sum over the whole global step.
            with self._no_sync(not last):
                with self._autocast():
                    loss_sum = self.net(batch)
                self.scaler.scale(loss_sum / (labelled / self.world_size)).backward()
            loss_total += float(loss_sum.detach())
        if self.ranks is not None:
            loss_total = self.ranks.sum(loss_total)
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, MAX_GRAD_NORM))
        self.scaler.step(self.optimizer)  # skipped (and the scale lowered) when fp16 gradients overflowed
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_lr = lr
        return loss_total / labelled, grad_norm, tokens

    def _no_sync(self, skip: bool) -> contextlib.AbstractContextManager[Any]:
        """Under DDP, accumulate without the gradient all-reduce (all micro-batches but the last)."""
        if skip and self.ranks is not None:
            return self.net.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()

    def _next_examples(self, count: int) -> list[datalib.Example]:
        n = len(self.train_examples)
        picked = []
        for _ in range(count):
            if self.position.index >= n:
                self.position = DataPosition(self.position.epoch + 1, 0)
            picked.append(self.train_examples[self._epoch_order()[self.position.index]])
            self.position.index += 1
        return picked

    def _epoch_order(self) -> list[int]:
        epoch = self.position.epoch
        if self._order is None or self._order[0] != epoch:
            self._order = (
                epoch,
                datalib.epoch_order(len(self.train_examples), self.cfg.training.seed, epoch),
            )
        return self._order[1]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.use_bf16 or self.cfg.use_fp16:
            return torch.autocast("cuda", dtype=torch.bfloat16 if self.cfg.use_bf16 else torch.float16)
        return contextlib.nullcontext()

    def _epoch(self) -> float:
        return round(self.position.epoch + self.position.index / len(self.train_examples), 4)

    def _lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def _progress(self) -> dict[str, Any]:
        return {
            "current_step": self.step,
            "total_steps": self.total_steps,
            "current_loss": self.stats["loss_last"],
            # The rate of the last step taken (before any: the first step's).
            "learning_rate": self.step_lr if self.step else self._lr(),
            "epoch": self._epoch(),
            "progress": round(100.0 * self.step / self.total_steps, 2),
        }

    def _report_step(self, loss: float, grad_norm: float, throughput: float) -> None:
        memory = memory_gb(self.cfg.device)
        self.ctx.metric(
            {
                "step": self.step,
                "ts": time.time(),
                "phase": "train",
                "epoch": self._epoch(),
                "loss": round(loss, 6),
                "lr": self.step_lr,
                "grad_norm": round(grad_norm, 6),
                "throughput": round(throughput, 1),
                # The protocol has one memory field: peak VRAM on CUDA, the process's RSS on CPU.
                "vram_gb": memory.get("vram_gb", memory.get("rss_gb")),
                "tokens": self.stats["tokens_processed"],
            }
        )
        self.ctx.log(
            f"step {self.step}/{self.total_steps} · loss {loss:.4f} · lr {self.step_lr:.1e} · "
            f"grad_norm {grad_norm:.3f} · {throughput:,.0f} tok/s"
        )
        self.ctx.set_phase("training", self._progress())

    # --- evaluation ---------------------------------------------------------------------------------------

    def _evaluate(self) -> float | None:
        if not self.eval_examples or not self.is_main:
            return None
        batches = datalib.packed_batches(self.eval_examples, self.cfg.training.batch_size, self.pad_id)
        with self._autocast():
            eval_loss = mean_token_loss(self.model, batches)
        self.stats["eval_loss_last"] = eval_loss
        self.ctx.metric(
            {
                "step": self.step,
                "ts": time.time(),
                "phase": "eval",
                "epoch": self._epoch(),
                "eval_loss": eval_loss,
            }
        )
        self.ctx.log(f"eval step {self.step} · eval_loss {eval_loss:.4f} · ppl {math.exp(eval_loss):.2f}")
        return eval_loss

    def _perplexity(self) -> float:
        """Perplexity on the labelled tokens of the eval split (or a fixed sample of the training split)."""
        # Without an eval split this is on examples the model trains on: the result says so (ppl_split).
        examples = self.eval_examples or self.train_examples[:PPL_SAMPLE]
        batches = datalib.packed_batches(examples, self.cfg.training.batch_size, self.pad_id)
        with self._autocast():
            return math.exp(mean_token_loss(self.model, batches))

    def final_eval(self) -> None:
        self._evaluate()
        self.stats["ppl_final"] = self._perplexity()

    # --- checkpoints: everything needed to resume exactly -------------------------------------------------

    def save_checkpoint(self) -> None:
        # Under DDP every rank's random state goes in (a collective, so every rank gets here); rank 0 writes.
        rng_ranks = None if self.ranks is None else self.ranks.gather(rng_state(self.cfg.device))
        if not self.is_main:
            self.last_saved_step = self.step
            return
        name = f"checkpoint-{self.step}"
        path = self.workdir / f"{name}.pt"
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "position": dataclasses.asdict(self.position),
            "trainable": {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(self.cfg.device),
            "config": self.cfg.to_dict(),
            "stats": dict(self.stats),
            "world_size": self.world_size,
        }
        if rng_ranks is not None:
            state["rng_ranks"] = rng_ranks
        torch.save(state, path)
        self.ctx.save_checkpoint(name, self.step, path)
        path.unlink(missing_ok=True)  # durable on the server now; the local copy only costs disk
        self.last_saved_step = self.step
        self.ctx.log(f"checkpoint {name} saved")

    def _restore(self, path: Path) -> None:
        # weights_only: a checkpoint arrives over the network, so it must not be able to run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise InvalidConfig(f"{path.name} is not a finetune checkpoint", param="resume_from")
        self._check_compatible(state["config"])
        missing = {n for n, p in self.model.named_parameters() if p.requires_grad} - set(state["trainable"])
        if missing:
            raise InvalidConfig(
                f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}"
            )
        self.model.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._restore_rng(state)
        self.position = DataPosition(**state["position"])
        self.step = self.last_saved_step = int(state["step"])
        self.stats.update(state["stats"])
        self.ctx.event("resumed", {"step": self.step})
        self.ctx.log(f"resumed from {path.name} at step {self.step}/{self.total_steps}")

    def _restore_rng(self, state: dict[str, Any]) -> None:
        """Each rank's own random state when the world size is the checkpoint's, so dropout continues
        exactly. Across world sizes everything else still carries over exactly (weights, optimizer,
        schedule, data position, the global batch); rank 0 takes the saved rank 0's stream and the
        other ranks draw fresh dropout masks from a seed derived from the step."""
        saved_world = int(state.get("world_size", 1))
        rank = 0 if self.ranks is None else self.ranks.rank
        ranks = state.get("rng_ranks") or [state["rng"]]
        if saved_world == self.world_size:
            set_rng_state(ranks[rank], self.cfg.device)
            return
        if self.is_main:
            self.ctx.log(
                f"the checkpoint was written by {saved_world} processes, this run has {self.world_size}: "
                "weights, optimizer, schedule and data position resume exactly; dropout masks are new"
            )
        if rank == 0:
            set_rng_state(state["rng"], self.cfg.device)
        else:
            seed_everything(rank_seed(self.cfg.training.seed, int(state["step"]), rank))

    def _check_compatible(self, saved: dict[str, Any]) -> None:
        """The settings that shape the weights and the data stream must match the checkpoint's."""
        now = self.cfg.to_dict()
        keys = [
            ("method",),
            ("lora",),
            ("training", "batch_size"),
            ("training", "gradient_accumulation_steps"),
        ]
        keys += [("training", "seed"), ("training", "max_seq_length"), ("training", "eval_split")]
        for key in keys:
            old: Any = saved
            new: Any = now
            for part in key:
                old, new = old.get(part), new.get(part)
            if old != new:
                raise InvalidConfig(
                    f"cannot resume: {'.'.join(key)} was {old!r} in the checkpoint, now {new!r}",
                    param=".".join(key),
                )

    # --- outputs and result -------------------------------------------------------------------------------

    def save_outputs(self) -> dict[str, Any]:
        """Write the adapter (or full model), tokenizer and resolved config, and upload each file."""
        out = self.workdir / "output"
        out.mkdir(parents=True, exist_ok=True)
        # One file, however large: outputs are flat names the server registers by name.
        self.model.save_pretrained(out, max_shard_size="1000GB")
        if self.cfg.method != "full" and "adapter" in self.ctx.inputs:
            # This run's adapter was trained over the start adapter merged into the base: the output is
            # both, as one adapter over the base. (Checkpoints hold this run's own, for resuming.)
            stack_adapters(Path(self.ctx.inputs["adapter"]), out)
        self.tokenizer.save_pretrained(out)
        (out / "training_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        for path in sorted(p for p in out.iterdir() if p.is_file() and p.name != "README.md"):
            self.ctx.upload_output(path)
        if self.cfg.method == "full":
            return {"adapter": None, "model": {"name": self.cfg.output_name}}
        size = (out / "adapter_model.safetensors").stat().st_size
        return {"adapter": {"name": self.cfg.output_name, "size_bytes": size}, "model": None}

    def result(self, outputs: dict[str, Any]) -> dict[str, Any]:
        s = self.stats
        baseline, final = s["ppl_baseline"], s["ppl_final"]
        delta = None if not baseline else round(100.0 * (final - baseline) / baseline, 4)
        return {
            "loss_final": s["loss_last"],
            "eval_loss_final": s["eval_loss_last"],
            "ppl_baseline": baseline,
            "ppl_final": final,
            "ppl_delta_pct": delta,
            # Where the perplexities were measured: "eval" (held out), or "train" (a sample of the
            # training split, when there is no eval split: it flatters the final figure).
            "ppl_split": "eval" if self.eval_examples else "train",
            "params_trainable": self.params_trainable,
            "params_before": self.params_before,
            # A LoRA adapter merges into the same shapes, so the deployed model keeps its size.
            "params_after": self.params_before,
            "tokens_processed": s["tokens_processed"],
            "gpu_seconds": round(s["train_seconds"], 3),
            "train_seconds": round(s["train_seconds"], 3),
            "steps": self.step,
            **outputs,
        }

    def cleanup(self) -> None:
        for name in ("net", "model", "optimizer", "scheduler"):
            if hasattr(self, name):
                delattr(self, name)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- the learning-rate schedule ----------------------------------------------------------------------------


def lr_factor(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiple of the peak rate that optimizer step `k` (0-based) runs at.

    Warmup rises linearly to the peak at step `warmup_steps` and never runs a step at 0 (step 1 gets
    1/warmup of the peak); then linear or cosine decay towards 0, or constant.
    """

    def factor(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (k - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


# --- randomness --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The seed of rank `rank` > 0's random stream (dropout) from `step` on, in a distributed run."""
    return (seed * 1_000_003 + step * 10_007 + rank) % 2**63


def rng_state(device: str) -> dict[str, Any]:
    """Every generator the run on `device` draws from, in types `torch.load(weights_only=True)` accepts.

    Of the CUDA generators only the training device's: a checkpoint of every GPU's, restored by
    position, broke on a worker with fewer GPUs and restored the wrong stream on another device index.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys).copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: str) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    # The saved training device's stream goes onto this run's training device, whatever its index.
    # A checkpoint without one (written on CPU) leaves it as seeded; so does an older checkpoint's
    # list of every GPU's state, which cannot say which one trained: only dropout masks differ then.
    cuda = state.get("cuda")
    if device.startswith("cuda") and isinstance(cuda, torch.Tensor):
        torch.cuda.set_rng_state(cuda, device)


def _as_tuple(value: Any) -> Any:
    # torch.save keeps tuples, but be lenient with lists (e.g. a state that went through JSON).
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value
