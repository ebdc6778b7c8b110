"""Loading models and tokenizers, and the measurements every job type reports (params, perplexity, memory)."""

from __future__ import annotations

import math
import os
import resource
import sys
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str = "auto") -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'; an explicit choice is checked, not overridden."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(DTYPES)}") from None


def bitsandbytes_available() -> bool:
    """QLoRA needs bitsandbytes and a CUDA device; importing it is the only reliable check."""
    if not torch.cuda.is_available():
        return False
    try:
        import bitsandbytes  # type: ignore[import-not-found]  # noqa: F401
    except Exception:  # a broken CUDA setup raises more than ImportError
        return False
    return True


# --- precision and speed-ups per device -------------------------------------------------------------------

COMPILE_ENV = "TUNERY_TORCH_COMPILE"  # 1 | 0 (default): torch.compile the model's backbone


def native_bf16(device: str) -> bool:
    """bf16 computed in hardware: Ampere or newer. `torch.cuda.is_bf16_supported()` alone also says
    yes on T4/V100, where bf16 is emulated (slow); those take fp16 with a GradScaler instead."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return False
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def half_dtype(device: str) -> torch.dtype | None:
    """The 16-bit type a CUDA device computes in (bf16 where native, else fp16); None on CPU."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.bfloat16 if native_bf16(device) else torch.float16


def load_dtype(device: str) -> torch.dtype:
    """Weights of a model loaded to run (a teacher, an evaluated or merged model): 16-bit on CUDA, fp32
    on CPU (where bf16 matmuls are slow and memory is rarely the limit)."""
    return half_dtype(device) or torch.float32


def compile_enabled() -> bool:
    """torch.compile is opt-in (`TUNERY_TORCH_COMPILE=1`): the first steps spend tens of seconds (CPU)
    compiling, and it stays off by default until it has been measured on the GPUs workers run on."""
    return os.environ.get(COMPILE_ENV, "0").strip().lower() in ("1", "true", "on")


def _language_model(model: torch.nn.Module) -> Any:
    """The transformers model itself (inside a peft wrapper, the model it wraps)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def apply_fused_kernels(model: torch.nn.Module, device: str) -> str | None:
    """liger-kernel's fused RMSNorm, RoPE and SwiGLU on CUDA when it is installed (its Triton kernels
    need a GPU); the loss is already fused here. Returns what was applied, or None."""
    if not str(device).startswith("cuda"):
        return None
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance  # type: ignore[import-not-found]
    except Exception:  # not installed, or a broken Triton: the plain modules run
        return None
    base = _language_model(model)
    try:
        # The loss is computed by causal_lm_loss_sum, so liger's own cross-entropy stays off.
        _apply_liger_kernel_to_instance(
            model=base,
            rope=True,
            rms_norm=True,
            swiglu=True,
            cross_entropy=False,
            fused_linear_cross_entropy=False,
        )
    except Exception as err:  # an architecture liger does not know: nothing was patched
        return f"liger-kernel not applied: {err}"
    # (liger patches only the model types it knows, and leaves any other model as it was.)
    return f"liger-kernel rope/rms_norm/swiglu requested for model type {base.config.model_type!r}"


def fuse_lora_adds(model: torch.nn.Module) -> int:
    """Fold each LoRA layer's scale-and-add into its up-projection: base(x) + s · B(A(x)) computed as
    addmm(base(x), A(x), Bᵀ, alpha=s), one kernel instead of a matmul, a multiply and an add (and
    their backward). Same arithmetic; measured ~10% of a LoRA step on the tiny CPU model. Only peft's
    plain `lora.Linear` layers; returns how many were switched."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    switched = 0
    for module in model.modules():
        if type(module) is LoraLinear:  # not the quantized (bitsandbytes) subclasses
            module.forward = types.MethodType(_fused_lora_forward, module)  # type: ignore[method-assign]
            switched += 1
    return switched


def _fused_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    simple = (
        not args
        and not kwargs  # mixed-batch adapter_names, variant arguments
        and not self.disable_adapters
        and not self.merged
        and name in self.lora_A
        and name not in self.lora_variant  # DoRA and other variants
        and self.lora_B[name].bias is None
        # peft casts x to the adapter's dtype; autocast (or equal dtypes) makes that a no-op here.
        and (torch.is_autocast_enabled(x.device.type) or x.dtype == self.lora_A[name].weight.dtype)
    )
    if not simple:
        return type(self).forward(self, x, *args, **kwargs)  # type: ignore[no-any-return]
    result = self.base_layer(x)
    down = self.lora_A[name](self.lora_dropout[name](x))
    up = self.lora_B[name].weight
    fused = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        down.reshape(-1, down.shape[-1]),
        up.t(),
        alpha=self.scaling[name],
    )
    return fused.view(result.shape).to(result.dtype)


def compile_backbone(model: torch.nn.Module) -> bool:
    """Compile the transformer backbone in place (the part `causal_lm_loss_sum` runs), or False when
    the model has no separable backbone."""
    parts = _backbone_and_head(model)
    if parts is None:
        return False
    # dynamic: sequence lengths vary from batch to batch; one graph serves them all.
    parts[0].compile(dynamic=True)
    return True


def load_tokenizer(source: str | Path, token: str | None = None) -> PreTrainedTokenizerBase:
    local = Path(source).is_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=local, token=token)
    # Batching needs a pad token; reusing EOS is the usual choice for models that ship without one.
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    source: str | Path,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    quantize_4bit: bool = False,
    token: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM + tokenizer from a hub id or a local directory (which never touches the network).

    `token` is a hub access token for gated or private hub models (the spec's `hf_token`).
    """
    local = Path(source).is_dir()
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": local, "token": token}
    if quantize_4bit:
        if not str(device).startswith("cuda"):
            raise ValueError("4-bit quantization (QLoRA) needs a CUDA device")
        # Imported here: bitsandbytes is an optional GPU-only dependency.
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype if torch_dtype != torch.float32 else torch.bfloat16,
        )
        # Quantized weights are placed at load time; they cannot be moved with .to() afterwards.
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    if not quantize_4bit:
        # (Called through nn.Module: transformers' decorated `.to` confuses type checkers.)
        torch.nn.Module.to(model, torch.device(device))
    tokenizer = load_tokenizer(source, token=token)
    return model, tokenizer


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameter count; shared (tied) tensors count once, as `numel` of unique storage would."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        # bitsandbytes 4-bit params pack two values per byte; `quant_state.shape` has the logical size.
        quant_state = getattr(param, "quant_state", None)
        total += math.prod(quant_state.shape) if quant_state is not None else param.numel()
    return total


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions of given logits, and their count.

    Only for logits a caller already has (e.g. a model whose head transforms its logits); training and
    evaluation go through `causal_lm_loss_sum`, which never builds the full logits.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, int((shift_labels != -100).sum())


# --- the causal-LM loss, fused with the LM head ----------------------------------------------------------
#
# Full-vocabulary fp32 logits cost batch x seq x vocab x 4 bytes (8 x 2048 x 128k: 8 GiB) and as much
# again for their gradient. The loss below runs the backbone, keeps only the hidden states of the
# labelled positions, and pushes them through the LM head a chunk of rows at a time: each chunk's
# logits give its loss and, while they exist, the gradient for the hidden states (and the head),
# so no chunk's logits outlive it (as liger-kernel's fused linear cross-entropy does on CUDA).

LOSS_CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MiB in fp32, whatever the vocabulary
# Config attributes of architectures whose forward transforms the logits after the LM head
# (softcapping, scaling): their loss is taken from the model's own logits instead.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def causal_lm_loss_sum(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions (label != -100) and their count.

    Equal to `token_loss_sum(model(...).logits, labels)` in value and gradient. `position_ids` that
    restart inside a row mark packed examples (transformers then keeps attention within each one).
    """
    parts = _backbone_and_head(model)
    if parts is None:
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits
        return token_loss_sum(logits, labels)
    backbone, head = parts
    # No KV cache: a loss never needs one, and with one transformers ignores packed position ids.
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    count = int(keep.sum())
    if count == keep.numel():  # every position labelled (plain text): a reshape, no gather
        return head_loss_sum(head, hidden[:, :-1].reshape(count, -1), targets.reshape(count)), count
    # Only labelled positions reach the head: prompt and padding positions cost no logits at all.
    return head_loss_sum(head, hidden[:, :-1][keep], targets[keep]), count


def head_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy(head(hidden), targets) over rows, `LOSS_CHUNK_ELEMENTS` logits at a time."""
    vocab = head.weight.shape[0]  # type: ignore[index]
    rows = max(1, LOSS_CHUNK_ELEMENTS // vocab)
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) connected
    if type(head) is torch.nn.Linear:
        weight: torch.Tensor = head.weight
        bias: torch.Tensor | None = head.bias
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # The chunks run with autocast off; cast here (differentiably) as autocast would have.
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows)  # type: ignore[no-any-return]
    # Any other head (a LoRA-wrapped or quantized one): checkpointed chunks, whose logits are
    # recomputed in backward instead of kept.
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        chunk = (hidden[start : start + rows], targets[start : start + rows])
        total = total + checkpoint(_module_loss_sum, head, *chunk, use_reentrant=False)
    return total


def _module_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy(hidden @ weight.T + bias, targets), its gradients computed chunk by chunk in
    forward (d loss / d logits = softmax − one-hot) so the logits never outlive their chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        rows: int,
    ) -> torch.Tensor:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias and bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            logits = F.linear(h, weight, bias).float()
            target_logits = logits.gather(1, t.unsqueeze(1)).squeeze(1)
            # log-sum-exp and softmax in place (fewest passes over the chunk): p = exp(z - max) / sum.
            peak = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(peak).exp_()
            norm = probs.sum(dim=1, keepdim=True)
            total += (peak.squeeze(1) + norm.log().squeeze(1) - target_logits).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            grad = probs.div_(norm)  # d loss / d logits = softmax − one-hot
            grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            if grad_hidden is not None:
                grad_hidden[start : start + rows] = grad.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), h.float())
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> Any:  # type: ignore[override]
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes

        def scaled(grad: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
            return None if grad is None else (grad * grad_total).to(dtype or grad.dtype)

        return (
            scaled(grad_hidden, grad_hidden.dtype if grad_hidden is not None else None),
            scaled(grad_weight, weight_dtype),
            scaled(grad_bias, bias_dtype),
            None,
            None,
        )


def _backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """A causal LM's (backbone returning hidden states, LM head), or None where that split would
    change the result (a head whose logits the model transforms) or cannot be found."""
    base = _language_model(model)
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    backbone = getattr(base, str(getattr(base, "base_model_prefix", "")), None)
    if head is None or getattr(head, "weight", None) is None or not isinstance(backbone, torch.nn.Module):
        return None
    config = getattr(base, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return backbone, head


def hidden_and_head(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.nn.Module]:
    """(last hidden states, LM head) so that head(hidden) are the logits; for a model whose head cannot
    be split off, (its logits, Identity). Callers then take logits a chunk of positions at a time."""
    parts = _backbone_and_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits, torch.nn.Identity()
    backbone, head = parts
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return hidden, head


def chunk_rows(head: torch.nn.Module, hidden: torch.Tensor) -> int:
    """Positions per chunk so that a chunk's logits hold about LOSS_CHUNK_ELEMENTS values."""
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if isinstance(weight, torch.Tensor) else hidden.shape[-1]
    return max(1, LOSS_CHUNK_ELEMENTS // vocab)


class CausalLMLoss(torch.nn.Module):
    """A causal LM whose forward is its summed token loss: what DistributedDataParallel wraps, so
    the fused loss runs inside the wrapped forward and gradients are still averaged."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss_sum, _ = causal_lm_loss_sum(
            self.model,
            batch["input_ids"],
            batch["labels"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
        )
        return loss_sum


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean loss over labelled batches (`input_ids`, `labels`, optionally
    `attention_mask` and `position_ids`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in batches:
            on_device = {k: v.to(device) for k, v in batch.items()}
            loss, n = causal_lm_loss_sum(
                model,
                on_device["input_ids"],
                on_device["labels"],
                attention_mask=on_device.get("attention_mask"),
                position_ids=on_device.get("position_ids"),
            )
            total += float(loss)
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no labelled tokens to evaluate")
    return total / count


def perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_len: int = 512,
    batch_size: int = 8,
) -> float:
    """exp(mean NLL per token) of `texts`, each truncated to `max_len` tokens, every token predicted."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = [
            tokenizer(text, truncation=True, max_length=max_len)["input_ids"]
            for text in texts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, : len(ids)] = torch.tensor(ids)
        batches.append({"input_ids": input_ids, "attention_mask": attention, "labels": labels})
    return math.exp(mean_token_loss(model, batches))


def memory_gb(device: str) -> dict[str, float]:
    """What to report as memory: peak VRAM on CUDA (`vram_gb`), else the process's resident set (`rss_gb`)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return {"vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    return {"rss_gb": round(_rss_bytes() / 2**30, 3)}


def _rss_bytes() -> int:
    try:
        # Current (not peak) resident set, in pages; Linux only.
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is bytes on macOS, kilobytes elsewhere.
        return peak if sys.platform == "darwin" else peak * 1024


def total_memory_gb(device: str) -> float:
    """Memory the worker announces: the GPU's total on CUDA, else the machine's RAM."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return 0.0
