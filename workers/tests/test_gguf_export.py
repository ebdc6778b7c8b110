"""GGUF export: written with GGUFWriter, read back with GGUFReader and with transformers' GGUF loader."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf import quants as gguf_quants
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tunery_worker.errors import InvalidConfig
from tunery_worker.gguf_export import (
    GGUFExportError,
    llama3_rope_factors,
    validate_quantization_types,
    write_gguf,
)
from tunery_worker.kquants import use_more_bits
from tunery_worker.modeling import load_model_and_tokenizer
from tunery_worker.tiny_model import make_tiny_model

TEXT = "<|im_start|>user\nThe quick brown fox jumps over the lazy dog. 42!<|im_end|>\n"


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen2"])
def tiny(request, tmp_path_factory):
    """(directory for GGUF files, model, tokenizer) of the session's tiny Llama / Qwen2."""
    model, tokenizer = load_model_and_tokenizer(request.getfixturevalue(request.param))
    return tmp_path_factory.mktemp("gguf"), model, tokenizer


def test_metadata_tensor_names_shapes_and_types(tiny):
    directory, model, tokenizer = tiny
    info = write_gguf(model, tokenizer, directory / "model-q8_0.gguf", "q8_0", name="tiny")
    reader = GGUFReader(directory / "model-q8_0.gguf")
    arch = model.config.model_type

    def field(key):
        return reader.get_field(key).contents()

    assert field("general.architecture") == arch
    assert field("general.name") == "tiny"
    assert field("general.file_type") == 7  # MOSTLY_Q8_0
    assert field(f"{arch}.block_count") == model.config.num_hidden_layers
    assert field(f"{arch}.embedding_length") == model.config.hidden_size
    assert field(f"{arch}.feed_forward_length") == model.config.intermediate_size
    assert field(f"{arch}.attention.head_count") == model.config.num_attention_heads
    assert field(f"{arch}.attention.head_count_kv") == model.config.num_key_value_heads
    assert field(f"{arch}.context_length") == model.config.max_position_embeddings
    assert (
        field(f"{arch}.rope.dimension_count") == model.config.hidden_size // model.config.num_attention_heads
    )
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == ("gpt-2" if arch == "llama" else "qwen2")
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == model.config.vocab_size
    assert tokens[tokenizer.eos_token_id] == tokenizer.eos_token
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field("tokenizer.ggml.token_type")[tokenizer.bos_token_id] == TokenType.CONTROL
    assert len(field("tokenizer.ggml.merges")) > 100
    assert field("tokenizer.chat_template") == tokenizer.chat_template

    tensors = {t.name: t for t in reader.tensors}
    layers = model.config.num_hidden_layers
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(layers):
        expected |= {
            f"blk.{i}.{part}.weight"
            for part in (
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            )
        }
        if arch == "qwen2":
            expected |= {f"blk.{i}.attn_q.bias", f"blk.{i}.attn_k.bias", f"blk.{i}.attn_v.bias"}
    assert set(tensors) == expected
    # GGUF lists dimensions innermost first: a [out, in] matrix is stored as (in, out).
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert tuple(tensors["blk.0.attn_q.weight"].shape) == (q_proj.shape[1], q_proj.shape[0])
    assert tensors["blk.0.attn_q.weight"].tensor_type == GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    assert info.tensor_types == {"Q8_0": 7 * layers + 2, "F32": len(expected) - 7 * layers - 2}


# Relative RMS error of the logits. f32 is exact. The tiny models' weights are Gaussian (the worst case
# for block quantization), which puts q8_0 near 2% and q4_0 near 33%; a misplaced or mis-permuted
# tensor gives ~100% or more.
@pytest.mark.parametrize(
    "quantization,tolerance", [("f32", 1e-6), ("f16", 2e-3), ("q8_0", 0.04), ("q4_0", 0.5)]
)
def test_transformers_loads_the_file_with_matching_logits(tiny, quantization, tolerance):
    directory, model, tokenizer = tiny
    file_name = f"model-{quantization}.gguf"
    write_gguf(model, tokenizer, directory / file_name, quantization)

    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name)
    loaded_tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert loaded_tokenizer(TEXT)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    relative_rms = ((got - expected).pow(2).mean() / expected.pow(2).mean()).sqrt().item()
    assert relative_rms < tolerance


def test_unsupported_quantization_is_invalid_config_naming_supported_types():
    with pytest.raises(InvalidConfig) as err:
        validate_quantization_types(["q8_0", "iq4_xs"])
    assert err.value.code == "invalid_config"
    assert "iq4_xs" in err.value.message and "q8_0, q5_1" in err.value.message
    assert "q4_k_m, q3_k_m, q2_k" in err.value.message
    assert "llama-quantize" in err.value.message
    with pytest.raises(InvalidConfig):
        validate_quantization_types(["q4_k_s"])
    assert validate_quantization_types(["Q8_0", "f16", "q8_0"]) == ["q8_0", "f16"]
    with pytest.raises(InvalidConfig):
        validate_quantization_types([])


def test_api_quantization_types_are_all_supported():
    # The API's QuantizationType enum (openapi.yaml), which users' requests are validated against.
    api_types = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
    api_types += ["q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k"]
    assert validate_quantization_types(api_types) == api_types


def test_k_quants_really_cannot_be_produced_by_gguf_py():
    # Why tunery_worker.kquants exists: if a gguf release learns to write K-quants, this fails, and
    # its writer can be compared with ours (test_kquants checks ours byte for byte against ggml).
    with pytest.raises(NotImplementedError):
        gguf_quants.quantize(np.zeros((1, 256), dtype=np.float32), GGMLQuantizationType.Q4_K)


def test_llama3_rope_factors_reproduce_transformers_scaled_frequencies():
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(
        hidden_size=2048, num_attention_heads=32, rope_parameters=rope, max_position_embeddings=131072
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = 64
    base = 1.0 / (500000.0 ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factors = llama3_rope_factors(rope, head_dim)
    assert factors.min() == 1.0 and factors.max() == 32.0  # both ends of the band are exercised
    np.testing.assert_allclose(base / factors, scaled.double().numpy(), rtol=1e-5)


def test_unknown_pre_tokenizer_is_refused(tiny, tmp_path):
    _, model, tokenizer = tiny
    from tokenizers import pre_tokenizers

    original = tokenizer.backend_tokenizer.pre_tokenizer
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    try:
        with pytest.raises(GGUFExportError) as err:
            write_gguf(model, tokenizer, tmp_path / "x.gguf", "f16")
        assert err.value.code == "invalid_config"
    finally:
        tokenizer.backend_tokenizer.pre_tokenizer = original


def test_tied_embeddings_write_no_output_tensor(tiny_qwen2, tmp_path):
    model, tokenizer = load_model_and_tokenizer(tiny_qwen2)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    write_gguf(model, tokenizer, tmp_path / "tied.gguf", "f32")

    assert "output.weight" not in {t.name for t in GGUFReader(tmp_path / "tied.gguf").tensors}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tied.gguf")
    assert loaded.config.tie_word_embeddings
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


# --- K-quants ---------------------------------------------------------------------------------------

Q = GGMLQuantizationType
LAYERS_256 = 4  # use_more_bits(i, 4) picks layers 2 and 3


@pytest.fixture(scope="module")
def tiny_256(tmp_path_factory):
    """A tiny Llama whose rows (hidden 256, intermediate 512) split into K-quant super-blocks."""
    directory = tmp_path_factory.mktemp("tiny-llama-256")
    source = make_tiny_model(
        directory / "source", arch="llama", hidden=256, intermediate=512, layers=LAYERS_256, heads=4
    )
    model, tokenizer = load_model_and_tokenizer(source)
    return directory, model, tokenizer


def relative_rms(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).pow(2).mean() / expected.pow(2).mean()).sqrt().item()


def k_mix_expected_type(gguf_name: str, mix: str) -> GGMLQuantizationType:
    """llama-quantize's choice for the tiny model (n_gqa = 2, untied), written out per mix."""
    match = re.match(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if gguf_name == "output_norm.weight" or (match and match[2].endswith("_norm")):
        return Q.F32
    if gguf_name == "output.weight":
        return Q.Q6_K
    bulk = {"q6_k": Q.Q6_K, "q5_k_m": Q.Q5_K, "q4_k_m": Q.Q4_K, "q3_k_m": Q.Q3_K, "q2_k": Q.Q2_K}[mix]
    if match is None:  # token_embd
        return bulk
    layer, part = int(match[1]), match[2]
    if mix in ("q4_k_m", "q5_k_m") and part in ("attn_v", "ffn_down") and use_more_bits(layer, LAYERS_256):
        return Q.Q6_K
    if mix == "q3_k_m":
        return {"attn_v": Q.Q5_K if layer < 2 else Q.Q4_K, "ffn_down": Q.Q4_K, "attn_output": Q.Q4_K}.get(
            part, bulk
        )
    if mix == "q2_k":
        return {"attn_v": Q.Q3_K, "ffn_down": Q.Q3_K, "attn_output": Q.Q3_K}.get(part, bulk)
    return bulk


# Relative RMS error bound of a Gaussian weight matrix per type (measured in test_kquants, with margin).
WEIGHT_ERROR = {Q.F32: 1e-7, Q.Q6_K: 0.025, Q.Q5_K: 0.045, Q.Q4_K: 0.085, Q.Q3_K: 0.17, Q.Q2_K: 0.33}


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q2_k"])
def test_k_quant_mix_types_per_tensor_and_weights_read_back(tiny_256, mix):
    directory, model, tokenizer = tiny_256
    file_name = f"model-{mix}.gguf"
    info = write_gguf(model, tokenizer, directory / file_name, mix)

    reader = GGUFReader(directory / file_name)
    types = {t.name: GGMLQuantizationType(t.tensor_type) for t in reader.tensors}
    assert types == {name: k_mix_expected_type(name, mix) for name in types}
    assert len(types) == 9 * LAYERS_256 + 3
    assert sum(info.tensor_types.values()) == len(types)

    # transformers dequantizes with gguf-py and undoes the RoPE permutation: every weight comes back
    # within its type's error (a misplaced or mis-permuted matrix would be off by ~140%).
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name).state_dict()
    source = model.state_dict()
    assert set(loaded) == set(source)
    by_hf_name = {
        "lm_head.weight": "output.weight",
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    hf_parts = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for hf_name, weight in source.items():
        match = re.match(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
        gguf_name = by_hf_name.get(hf_name) or f"blk.{match[1]}.{hf_parts[match[2]]}.weight"
        assert relative_rms(loaded[hf_name], weight) < WEIGHT_ERROR[types[gguf_name]], hf_name


def test_q4_k_m_logits_are_close_and_rank_with_the_bits(tiny_256):
    # Relative RMS error of the logits. This random model amplifies weight noise (q8_0 gives ~5%); the
    # measured values are q6_k 15%, q4_k_m 59%, q2_k 116%. Loose bounds: a broken tensor gives far more.
    directory, model, tokenizer = tiny_256
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    errors = {}
    for mix in ("q6_k", "q4_k_m", "q2_k"):
        file_name = f"logits-{mix}.gguf"
        write_gguf(model, tokenizer, directory / file_name, mix)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name)
        with torch.no_grad():
            errors[mix] = relative_rms(loaded(ids).logits, model(ids).logits)
    assert errors["q6_k"] < 0.25
    assert errors["q4_k_m"] < 0.8
    assert errors["q6_k"] < errors["q4_k_m"] < errors["q2_k"]


def test_tied_embeddings_are_quantized_as_the_output_projection(tmp_path):
    source = make_tiny_model(tmp_path / "source", arch="qwen2", hidden=256, intermediate=512, layers=2)
    model, tokenizer = load_model_and_tokenizer(source)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    write_gguf(model, tokenizer, tmp_path / "tied.gguf", "q4_k_m")

    types = {t.name: GGMLQuantizationType(t.tensor_type) for t in GGUFReader(tmp_path / "tied.gguf").tensors}
    assert "output.weight" not in types
    assert types["token_embd.weight"] == Q.Q6_K  # llama.cpp reuses it as the output projection
    assert types["blk.0.attn_q.weight"] == Q.Q4_K
    assert types["blk.0.attn_q.bias"] == Q.F32
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tied.gguf")
    assert loaded.config.tie_word_embeddings
    assert relative_rms(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight) < 0.025


def test_rows_k_quants_cannot_split_fall_back_like_llama_quantize(tiny, tmp_path):
    # The session's tiny models have hidden size 64: no K-quant super-block fits a row.
    _, model, tokenizer = tiny
    info = write_gguf(model, tokenizer, tmp_path / "small.gguf", "q4_k_m")
    types = {t.name: GGMLQuantizationType(t.tensor_type) for t in GGUFReader(tmp_path / "small.gguf").tensors}
    assert types["output.weight"] == Q.Q8_0
    assert types["token_embd.weight"] == Q.Q5_0  # Q4_K's fallback
    assert types["blk.0.attn_q.weight"] == Q.Q5_0
    # attn_v and ffn_down of layers llama.cpp gives more bits are Q6_K, whose fallback is Q8_0.
    assert types["blk.1.attn_v.weight"] == Q.Q8_0  # use_more_bits(1, 2): the last eighth
    assert "Q4_K" not in info.tensor_types and "Q6_K" not in info.tensor_types
