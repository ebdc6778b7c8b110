"""Write a GGUF file (llama.cpp's model format) from a Hugging Face Llama or Qwen2 causal LM.

    validate_quantization_types(["q8_0", "f16"])        # up front, before any work
    write_gguf(model, tokenizer, Path("model-q8_0.gguf"), "q8_0")

What goes in, following llama.cpp's own `convert_hf_to_gguf.py`:
- architecture metadata under `llama.*` / `qwen2.*` (context length, widths, heads, RMSNorm eps,
  RoPE base and head size), the file type and the quantization version;
- the tokenizer as llama.cpp's byte-level BPE (`tokenizer.ggml.model = "gpt2"`): every token by id,
  token types (normal / control / user-defined / unused), merges, special token ids, whether BOS/EOS
  are added, the pre-tokenizer name (which split regex the merges were learned with), and the chat
  template;
- every weight under llama.cpp's tensor names (`token_embd`, `blk.N.attn_q`, ...), taken from
  gguf-py's own name map. Llama's q/k projections are permuted to llama.cpp's RoPE layout (Qwen2 uses
  the NeoX layout, which needs none). A tied LM head is left out: llama.cpp then reuses `token_embd`.

Quantization is done here, with no llama.cpp binary: the legacy types (q8_0, q5_1, q5_0, q4_1, q4_0)
with `gguf.quants`, the K-quants with `tunery_worker.kquants`, which follows ggml's reference
quantizers (gguf-py 0.19 can read K-quants but not write them). The K-quant files are llama-quantize's
mixes (`mix_tensor_type`): q4_k_m is Q4_K throughout except attn_v and ffn_down in half of the layers
(llama.cpp's `use_more_bits`: the first and last eighth and every third layer between) and the output
projection, which are Q6_K; q5_k_m is the same over Q5_K; q6_k is Q6_K throughout; q3_k_m and q2_k
follow llama.cpp's table likewise. As in llama-quantize, and for every quantized type,
the output projection (or, with tied embeddings, the token embeddings it reuses) is Q6_K (q8_0 files
keep Q8_0); 1-D tensors (norms, biases) stay f32; and a matrix whose rows do not split into its type's
blocks falls back: a K-quant row that 256 does not divide becomes Q5_0 (for Q4_K), Q5_1 (Q5_K),
Q8_0 (Q6_K) or Q4_0 (Q2_K, Q3_K), an output projection becomes Q8_0, and a row that not even 32
divides is stored f16. i-quants and the other types llama-quantize makes are an `invalid_config` error
that names the supported types (the same list as the API's QuantizationType).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    TokenType,
    get_tensor_name_map,
)
from gguf import quants as gguf_quants
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT_REGEX

from tunery_worker import kquants
from tunery_worker.errors import InvalidConfig

Q = GGMLQuantizationType

# name → (tensor type for the bulk of the matrices, the file type llama.cpp reports).
SUPPORTED_QUANTIZATIONS: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q6_k": (Q.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "q5_k_m": (Q.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q4_k_m": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q3_k_m": (Q.Q3_K, LlamaFileType.MOSTLY_Q3_K_M),
    "q2_k": (Q.Q2_K, LlamaFileType.MOSTLY_Q2_K),
}

ARCHITECTURES: dict[str, MODEL_ARCH] = {"llama": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2}

# Meta's Llama 3 split regex (its tokenizer.json); llama.cpp calls this pre-tokenizer "llama-bpe".
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Split regex → llama.cpp's name for it (`tokenizer.ggml.pre`). The name decides how llama.cpp cuts
# text before applying merges, so a tokenizer with any other regex is refused rather than mislabelled.
KNOWN_SPLIT_REGEXES = {QWEN2_SPLIT_REGEX: "qwen2", LLAMA3_SPLIT_REGEX: "llama-bpe"}


class GGUFExportError(InvalidConfig):
    """The model or tokenizer cannot be written faithfully as GGUF; retrying cannot help."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="export_gguf")


@dataclass
class GGUFInfo:
    path: Path
    quantization: str
    size_bytes: int
    # GGML type name → number of tensors stored with it.
    tensor_types: dict[str, int] = field(default_factory=dict)
    # Tokenizer ids at or beyond the embedding's row count: the model has no weights for them.
    dropped_token_ids: list[int] = field(default_factory=list)


def validate_quantization_types(types: list[str] | tuple[str, ...]) -> list[str]:
    """Lower-cased, de-duplicated types; `InvalidConfig` naming the supported ones for anything else."""
    if not types:
        raise InvalidConfig("quantization_types must name at least one type when export_gguf is true")
    resolved: list[str] = []
    for raw in types:
        name = str(raw).strip().lower()
        if name not in SUPPORTED_QUANTIZATIONS:
            hint = ""
            if "_k" in name or name.startswith(("iq", "tq")):
                hint = (
                    " i-quants, ternary types and the other K-quant mixes (q4_k_s, q3_k_l, ...) "
                    "are not produced by this exporter; export f16 and run llama.cpp's llama-quantize "
                    "for those."
                )
            raise InvalidConfig(
                f"unsupported quantization type {raw!r}: "
                f"supported are {', '.join(SUPPORTED_QUANTIZATIONS)}.{hint}",
                param="quantization_types",
            )
        if name not in resolved:
            resolved.append(name)
    return resolved


def write_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    quantization: str,
    name: str | None = None,
) -> GGUFInfo:
    """Write `model` (plain weights: merge any LoRA adapter first) and its tokenizer to `path`."""
    (quantization,) = validate_quantization_types([quantization])
    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise GGUFExportError(
            f"GGUF export supports {sorted(ARCHITECTURES)} models, not {config.model_type!r}"
        )
    arch = ARCHITECTURES[config.model_type]
    bulk_type, file_type = SUPPORTED_QUANTIZATIONS[quantization]
    path.parent.mkdir(parents=True, exist_ok=True)

    # A spooled temp file keeps memory bounded: tensors go to disk as they are added.
    writer = GGUFWriter(path, MODEL_ARCH_NAMES[arch], use_temp_file=True)
    extra_tensors = _write_architecture(writer, config, arch)
    writer.add_name(name or str(getattr(config, "_name_or_path", "") or config.model_type))
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    dropped = _write_tokenizer(writer, tokenizer, config.vocab_size)

    n_head = config.num_attention_heads
    plan = _MixContext(
        file_type=file_type,
        bulk_type=bulk_type,
        n_layer=config.num_hidden_layers,
        n_gqa=n_head // (getattr(config, "num_key_value_heads", None) or n_head),
        # A tied LM head is not written (see _gguf_tensors), and llama.cpp then reuses token_embd.
        has_output=not bool(getattr(config, "tie_word_embeddings", False)),
    )
    counts: dict[str, int] = {}
    for gguf_name, array in [*_gguf_tensors(model, arch), *extra_tensors]:
        ggml_type = _tensor_type(gguf_name, array, plan)
        if ggml_type in (Q.F32, Q.F16):
            writer.add_tensor(gguf_name, array.astype(np.float32 if ggml_type == Q.F32 else np.float16))
        elif ggml_type in kquants.K_QUANT_TYPES:
            writer.add_tensor(gguf_name, kquants.quantize(array, ggml_type), raw_dtype=ggml_type)
        else:
            writer.add_tensor(gguf_name, gguf_quants.quantize(array, ggml_type), raw_dtype=ggml_type)
        counts[ggml_type.name] = counts.get(ggml_type.name, 0) + 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFInfo(
        path=path,
        quantization=quantization,
        size_bytes=path.stat().st_size,
        tensor_types=counts,
        dropped_token_ids=dropped,
    )


# --- architecture ---------------------------------------------------------------------------------


def _write_architecture(writer: GGUFWriter, config: Any, arch: MODEL_ARCH) -> list[tuple[str, np.ndarray]]:
    """Hyperparameters under `<arch>.*`; returns the extra tensors its RoPE variant needs."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "use_sliding_window", False):
        raise GGUFExportError("sliding-window attention is not supported by llama.cpp's qwen2 architecture")

    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    if rope_type == "default":
        return []
    if rope_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return []
    if rope_type == "llama3" and arch == MODEL_ARCH.LLAMA:
        # llama.cpp applies Llama 3's frequency-dependent scaling through per-frequency divisors.
        name = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"
        return [(name, llama3_rope_factors(rope, head_dim))]
    raise GGUFExportError(f"RoPE scaling {rope_type!r} is not supported by this GGUF exporter")


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors d_i so that base_freq_i / d_i is Llama 3's scaled RoPE frequency.

    Wavelengths shorter than original_context/high_freq_factor keep their frequency, longer than
    original_context/low_freq_factor are divided by `factor`, and the band between is interpolated.
    """
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


# --- tensors --------------------------------------------------------------------------------------


def _gguf_tensors(model: PreTrainedModel, arch: MODEL_ARCH):
    """(llama.cpp name, float32 array) for every weight, one at a time."""
    config = model.config
    name_map = get_tensor_name_map(arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd when there is no output tensor
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = name_map.get_name(stem)
        if gguf_stem is None:
            raise GGUFExportError(f"no llama.cpp name for tensor {hf_name!r}")
        array = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        if arch == MODEL_ARCH.LLAMA and stem.endswith("self_attn.q_proj"):
            array = _permute_for_rope(array, n_head, n_head)
        elif arch == MODEL_ARCH.LLAMA and stem.endswith("self_attn.k_proj"):
            array = _permute_for_rope(array, n_head, n_kv_head)
        yield f"{gguf_stem}.{suffix}", array


def _permute_for_rope(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """HF Llama rotates the two halves of each head; llama.cpp rotates interleaved pairs. Reorder rows
    so that llama.cpp's rotation sees what HF's did (the inverse of what HF's GGUF loader undoes)."""
    heads = n_head_kv if n_head != n_head_kv else n_head
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@dataclass(frozen=True)
class _MixContext:
    """What llama-quantize's per-tensor type choice depends on besides the tensor itself."""

    file_type: LlamaFileType
    bulk_type: GGMLQuantizationType
    n_layer: int
    n_gqa: int
    has_output: bool


def _tensor_type(gguf_name: str, array: np.ndarray, plan: _MixContext) -> GGMLQuantizationType:
    if array.ndim == 1 or plan.bulk_type == Q.F32:
        return Q.F32  # llama.cpp computes norms and adds biases in f32
    if plan.bulk_type in (Q.F16, Q.BF16):
        return plan.bulk_type
    return kquants.mix_tensor_type(
        plan.file_type,
        plan.bulk_type,
        gguf_name,
        ncols=array.shape[-1],
        n_layer=plan.n_layer,
        n_gqa=plan.n_gqa,
        has_output=plan.has_output,
    )


# --- tokenizer ------------------------------------------------------------------------------------


def _write_tokenizer(writer: GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[int]:
    """Byte-level BPE metadata; returns the tokenizer ids the embedding has no row for (left out)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast (tokenizers-backed) tokenizer")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE":
        raise GGUFExportError(f"GGUF export supports byte-level BPE tokenizers, not {spec['model']['type']}")

    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.NORMAL)] * vocab_size
    dropped: list[int] = []
    for token, token_id in spec["model"]["vocab"].items():
        if token_id < vocab_size:
            tokens[token_id] = token
        else:
            dropped.append(token_id)
    for added in spec.get("added_tokens", []):
        token_id = added["id"]
        if token_id >= vocab_size:
            dropped.append(token_id)
            continue
        tokens[token_id] = added["content"]
        types[token_id] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    for token_id, token in enumerate(tokens):
        if token is None:
            # Embedding rows without a token (vocab padded for alignment): llama.cpp's placeholder.
            tokens[token_id] = f"[PAD{token_id}]"
            types[token_id] = int(TokenType.UNUSED)

    merges = [
        merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"].get("merges", [])
    ]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list([str(token) for token in tokens])
    writer.add_token_types(types)
    writer.add_token_merges(merges)

    special_ids = {
        writer.add_bos_token_id: tokenizer.bos_token_id,
        writer.add_eos_token_id: tokenizer.eos_token_id,
        writer.add_unk_token_id: tokenizer.unk_token_id,
        writer.add_pad_token_id: tokenizer.pad_token_id,
    }
    for add, token_id in special_ids.items():
        if token_id is not None and token_id < vocab_size:
            add(token_id)
    # Measured, not read from flags: what the tokenizer really puts around a text.
    sample = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(sample) and sample[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(sample) and sample[-1] == tokenizer.eos_token_id)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
    return sorted(set(dropped))


def _pre_tokenizer_name(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's name for how this tokenizer splits text before merging (`tokenizer.ggml.pre`)."""
    if pre_tokenizer and pre_tokenizer["type"] == "ByteLevel":
        if pre_tokenizer.get("use_regex", True) and not pre_tokenizer.get("add_prefix_space", False):
            return "gpt-2"  # ByteLevel's built-in regex is GPT-2's
    if pre_tokenizer and pre_tokenizer["type"] == "Sequence":
        parts = pre_tokenizer["pretokenizers"]
        if (
            len(parts) == 2
            and parts[0]["type"] == "Split"
            and parts[1]["type"] == "ByteLevel"
            and not parts[1].get("use_regex", True)
        ):
            regex = parts[0]["pattern"].get("Regex")
            if regex in KNOWN_SPLIT_REGEXES:
                return KNOWN_SPLIT_REGEXES[regex]
    raise GGUFExportError(
        "the tokenizer's pre-tokenizer is not one llama.cpp can reproduce "
        f"(supported: GPT-2 byte-level, {', '.join(sorted(KNOWN_SPLIT_REGEXES.values()))}): {pre_tokenizer}"
    )
