"""GGUF export: written with GGUFWriter, read back with GGUFReader and with transformers' GGUF loader."""

from __future__ import annotations

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
from tunery_worker.modeling import load_model_and_tokenizer

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
        validate_quantization_types(["q8_0", "q4_k_m"])
    assert err.value.code == "invalid_config"
    assert "q4_k_m" in err.value.message and "q8_0, q5_1" in err.value.message
    assert "llama-quantize" in err.value.message
    assert validate_quantization_types(["Q8_0", "f16", "q8_0"]) == ["q8_0", "f16"]
    with pytest.raises(InvalidConfig):
        validate_quantization_types([])


def test_k_quants_really_cannot_be_produced_by_gguf_py():
    # The claim behind refusing q4_k_m: if a gguf release learns to write K-quants, this fails and
    # the exporter should offer them.
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
