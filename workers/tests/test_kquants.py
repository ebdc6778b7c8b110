"""K-quant writers: byte layout and sizes, round trip through gguf-py's own dequantizer, error levels
against gguf-py's legacy types, identity with ggml's reference quantizer, and llama-quantize's mixes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

from tunery_worker.kquants import K_QUANT_TYPES, mix_tensor_type, quantize, use_more_bits

Q = GGMLQuantizationType
F = LlamaFileType


def gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def relative_rms(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.sqrt(((got - expected) ** 2).mean() / (expected**2).mean()))


def awkward_weights() -> np.ndarray:
    """8 x 512 float32 values built from integer hashing only, so they are the same bits on every
    platform and numpy version: Gaussian-like rows at several scales, and the edge cases of the
    quantizers' branches (all zeros, a constant, all negative, sparse, one loud half-row)."""
    i = np.arange(8 * 512, dtype=np.uint64)
    h = i * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    uniforms = [((h >> np.uint64(16 * k)) & np.uint64(0xFFFF)).astype(np.float32) / 65536 for k in range(4)]
    bell = (uniforms[0] + uniforms[1] + uniforms[2] + uniforms[3] - 2).reshape(8, 512)  # Irwin-Hall
    x = bell * np.float32(0.035)
    x[1] = bell[1] ** 3  # heavy tails
    x[2] = 0
    x[3] = 0.25
    x[4] = -np.abs(bell[4]) - np.float32(0.5)
    x[5] = np.where((h.reshape(8, 512)[5] & np.uint64(31)) == 0, bell[5], np.float32(0))
    x[6] = bell[6] * np.float32(1e-4)
    x[7, :128] *= 40
    return x


def test_block_sizes_match_ggml():
    expected = {Q.Q2_K: 84, Q.Q3_K: 110, Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}
    assert set(expected) == K_QUANT_TYPES
    x = gaussian(3, 512)
    for qtype, block_bytes in expected.items():
        assert GGML_QUANT_SIZES[qtype] == (256, block_bytes)
        data = quantize(x, qtype)
        assert data.dtype == np.uint8 and data.shape == (3, 2 * block_bytes)
        assert gguf_quants.dequantize(data, qtype).shape == x.shape


# Relative RMS error on N(0, 1) weights, read back with gguf-py's dequantizer. Measured (65536 values):
# Q6_K 1.78%, Q5_K 3.62%, Q4_K 7.15%, Q3_K 15.1%, Q2_K 29.7%; gguf-py's Q8_0 0.54%, Q5_0 4.28%,
# Q4_1 7.83%, Q4_0 8.61%. (Gaussian weights are the hard case: at 4.5 bits per weight even an ideal
# quantizer cannot beat 2^-4.5 = 4.4%.)
ERROR_BOUNDS = {Q.Q6_K: 0.02, Q.Q5_K: 0.04, Q.Q4_K: 0.08, Q.Q3_K: 0.165, Q.Q2_K: 0.32}


@pytest.fixture(scope="module")
def gaussian_errors() -> dict[GGMLQuantizationType, float]:
    x = gaussian(64, 1024, seed=1)
    errors = {}
    for qtype in [*ERROR_BOUNDS, Q.Q8_0, Q.Q5_0, Q.Q4_1, Q.Q4_0]:
        data = quantize(x, qtype) if qtype in K_QUANT_TYPES else gguf_quants.quantize(x, qtype)
        errors[qtype] = relative_rms(gguf_quants.dequantize(data, qtype), x)
    return errors


@pytest.mark.parametrize("qtype", list(ERROR_BOUNDS), ids=lambda t: t.name)
def test_round_trip_error_is_within_the_types_bound(gaussian_errors, qtype):
    assert gaussian_errors[qtype] < ERROR_BOUNDS[qtype]


def test_error_ordering_against_gguf_py_legacy_types(gaussian_errors):
    e = gaussian_errors
    assert e[Q.Q8_0] < e[Q.Q6_K] < e[Q.Q5_K] < e[Q.Q4_K] < e[Q.Q3_K] < e[Q.Q2_K]
    # Each K-quant beats the legacy type of its bit width (which spends about as many bits).
    assert e[Q.Q5_K] < e[Q.Q5_0]
    assert e[Q.Q4_K] < e[Q.Q4_1] < e[Q.Q4_0]


# sha256 of ggml's own bytes for `awkward_weights()`: `ggml_quantize_chunk` (which, with no importance
# matrix, runs `quantize_row_q*_K_ref`) from libggml-base 0.15.3 built from source on x86-64. Matching
# them means the vectorised searches make ggml's every decision, down to float32 summation order.
GGML_REFERENCE_SHA256 = {
    Q.Q2_K: "61f22e2466ec5a7db04a59efb859a0a1cee18278e40c57e0e43efc0c5d5da9a1",
    Q.Q3_K: "a81dd6e7cc20cf856101383faea2d6e14409853ef7d30e8131be28025fe1e0bd",
    Q.Q4_K: "2f8e49acc890b2f53db519974593f7e9a50d5190569821937c27b31a00e9fda1",
    Q.Q5_K: "461559bdafa869bc7446bf3fcca373ad38cdbe3bda14171c8327e1072d44a93a",
    Q.Q6_K: "51266333362a25c3c64c49ff65544b71423aa094e28c0ba38a58ced70506b6eb",
}


@pytest.mark.parametrize("qtype", list(GGML_REFERENCE_SHA256), ids=lambda t: t.name)
def test_bytes_are_identical_to_ggmls_reference_quantizer(qtype):
    data = quantize(awkward_weights(), qtype)
    assert hashlib.sha256(data.tobytes()).hexdigest() == GGML_REFERENCE_SHA256[qtype]


@pytest.mark.parametrize("qtype", sorted(K_QUANT_TYPES), ids=lambda t: t.name)
def test_edge_rows_round_trip(qtype):
    x = awkward_weights()
    y = gguf_quants.dequantize(quantize(x, qtype), qtype)
    assert np.isfinite(y).all()
    assert (y[2] == 0).all()  # zeros stay exactly zero
    np.testing.assert_allclose(y[3], 0.25, rtol=2e-3)  # a constant is kept (through its fp16 scale)
    assert (y[4] < 0).mean() > 0.95  # sign of an all-negative row
    tolerance = 1.5 * ERROR_BOUNDS[qtype]
    assert relative_rms(y[0], x[0]) < tolerance
    # Weights of ~1e-5 put the fp16 super-block scales among the subnormals, which costs precision
    # (in ggml alike: the bytes are ggml's), but nothing underflows to zero.
    assert relative_rms(y[6], x[6]) < max(0.25, tolerance)


def test_rows_must_split_into_super_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((2, 384), np.float32), Q.Q4_K)
    with pytest.raises(ValueError, match="not a K-quant"):
        quantize(np.zeros((2, 256), np.float32), Q.Q8_0)


def test_larger_tensor_round_trips_through_many_chunks():
    x = gaussian(1024, 1024, seed=2)  # 4096 super-blocks: several of quantize()'s chunks
    y = gguf_quants.dequantize(quantize(x, Q.Q4_K), Q.Q4_K)
    assert relative_rms(y, x) < ERROR_BOUNDS[Q.Q4_K]
    # Chunking does not change any block: the last rows quantized alone give the same bytes.
    np.testing.assert_array_equal(quantize(x[-3:], Q.Q4_K), quantize(x, Q.Q4_K)[-3:])


# --- mixes ------------------------------------------------------------------------------------------


def test_use_more_bits_is_half_the_layers():
    assert [i for i in range(32) if use_more_bits(i, 32)] == [
        *(0, 1, 2, 3),
        *(6, 9, 12, 15, 18, 21, 24, 27),
        *(28, 29, 30, 31),
    ]
    assert [i for i in range(4) if use_more_bits(i, 4)] == [2, 3]
    assert [i for i in range(24) if use_more_bits(i, 24)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]


def mix(file_type, bulk, name, ncols=4096, n_layer=32, n_gqa=4, has_output=True):
    return mix_tensor_type(file_type, bulk, name, ncols, n_layer, n_gqa, has_output)


LAYER_TENSORS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def layer_types(file_type, bulk, n_layer=32, n_gqa=4):
    return {
        (i, part): mix(file_type, bulk, f"blk.{i}.{part}.weight", n_layer=n_layer, n_gqa=n_gqa)
        for i in range(n_layer)
        for part in LAYER_TENSORS
    }


@pytest.mark.parametrize("file_type,bulk", [(F.MOSTLY_Q4_K_M, Q.Q4_K), (F.MOSTLY_Q5_K_M, Q.Q5_K)])
def test_k_m_mixes(file_type, bulk):
    types = layer_types(file_type, bulk)
    more = {i for i in range(32) if use_more_bits(i, 32)}
    for (i, part), qtype in types.items():
        if part in ("attn_v", "ffn_down") and i in more:
            assert qtype == Q.Q6_K, (i, part)
        else:
            assert qtype == bulk, (i, part)
    assert mix(file_type, bulk, "output.weight") == Q.Q6_K
    assert mix(file_type, bulk, "token_embd.weight") == bulk
    # With tied embeddings token_embd is also the output projection, and is quantized as one.
    assert mix(file_type, bulk, "token_embd.weight", has_output=False) == Q.Q6_K


def test_q6_k_is_q6_k_throughout():
    assert set(layer_types(F.MOSTLY_Q6_K, Q.Q6_K).values()) == {Q.Q6_K}
    assert mix(F.MOSTLY_Q6_K, Q.Q6_K, "output.weight") == Q.Q6_K
    assert mix(F.MOSTLY_Q6_K, Q.Q6_K, "token_embd.weight") == Q.Q6_K


def test_q3_k_m_mix():
    types = layer_types(F.MOSTLY_Q3_K_M, Q.Q3_K)
    for (i, part), qtype in types.items():
        if part == "attn_v":
            assert qtype == (Q.Q5_K if i < 2 else Q.Q4_K)
        elif part == "ffn_down":
            assert qtype == (Q.Q5_K if i < 32 // 16 else Q.Q4_K)
        elif part == "attn_output":
            assert qtype == Q.Q4_K
        else:
            assert qtype == Q.Q3_K
    assert mix(F.MOSTLY_Q3_K_M, Q.Q3_K, "output.weight") == Q.Q6_K


@pytest.mark.parametrize("n_gqa,attn_v", [(4, Q.Q4_K), (2, Q.Q3_K)])
def test_q2_k_mix(n_gqa, attn_v):
    expected = {
        "attn_v": attn_v,
        "ffn_down": Q.Q3_K,
        "attn_output": Q.Q3_K,
        "attn_q": Q.Q2_K,
        "attn_k": Q.Q2_K,
        "ffn_gate": Q.Q2_K,
        "ffn_up": Q.Q2_K,
    }
    for (_, part), qtype in layer_types(F.MOSTLY_Q2_K, Q.Q2_K, n_gqa=n_gqa).items():
        assert qtype == expected[part]
    assert mix(F.MOSTLY_Q2_K, Q.Q2_K, "output.weight") == Q.Q6_K


def test_legacy_types_keep_their_type_but_output_is_q6_k_as_in_llama_quantize():
    assert set(layer_types(F.MOSTLY_Q4_0, Q.Q4_0).values()) == {Q.Q4_0}
    assert mix(F.MOSTLY_Q4_0, Q.Q4_0, "output.weight") == Q.Q6_K
    assert mix(F.MOSTLY_Q4_0, Q.Q4_0, "token_embd.weight") == Q.Q4_0
    assert mix(F.MOSTLY_Q8_0, Q.Q8_0, "output.weight") == Q.Q8_0
    assert mix(F.MOSTLY_Q4_0, Q.Q4_0, "output.weight", ncols=64) == Q.Q8_0


def test_rows_that_256_does_not_divide_fall_back_like_llama_quantize():
    name = "blk.0.attn_q.weight"
    assert mix(F.MOSTLY_Q4_K_M, Q.Q4_K, name, ncols=384) == Q.Q5_0
    assert mix(F.MOSTLY_Q5_K_M, Q.Q5_K, name, ncols=384) == Q.Q5_1
    assert mix(F.MOSTLY_Q6_K, Q.Q6_K, name, ncols=384) == Q.Q8_0
    assert mix(F.MOSTLY_Q3_K_M, Q.Q3_K, "blk.9.attn_q.weight", ncols=384) == Q.Q4_0
    assert mix(F.MOSTLY_Q2_K, Q.Q2_K, name, ncols=384) == Q.Q4_0
    # attn_v in a use_more_bits layer is Q6_K, whose fallback is Q8_0.
    assert mix(F.MOSTLY_Q4_K_M, Q.Q4_K, "blk.0.attn_v.weight", ncols=384) == Q.Q8_0
    assert mix(F.MOSTLY_Q4_K_M, Q.Q4_K, "output.weight", ncols=384) == Q.Q8_0
    # Not even 32 divides the row: f16.
    assert mix(F.MOSTLY_Q4_K_M, Q.Q4_K, name, ncols=100) == Q.F16
    assert mix(F.MOSTLY_Q4_K_M, Q.Q4_K, "output.weight", ncols=100) == Q.F16
    assert mix(F.MOSTLY_Q4_0, Q.Q4_0, name, ncols=100) == Q.F16
