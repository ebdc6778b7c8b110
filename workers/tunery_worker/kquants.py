"""K-quant writers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) in numpy, and llama-quantize's per-tensor type mixes.

    data = quantize(weights, GGMLQuantizationType.Q4_K)       # uint8, GGUF byte layout
    mix_tensor_type(LlamaFileType.MOSTLY_Q4_K_M, GGMLQuantizationType.Q4_K, "blk.3.ffn_down.weight",
                    ncols=14336, n_layer=32, n_gqa=4, has_output=True)   # → Q6_K

gguf-py (0.19) dequantizes K-quants but cannot produce them. The writers here follow ggml's reference
quantizers, the ones llama-quantize runs when it is given no importance matrix (`quantize_row_q*_K_ref`
in ggml-quants.c): the same per-sub-block scale searches (`make_qx_quants` for Q6_K, `make_qkx2_quants`
for Q2_K/Q4_K/Q5_K, `make_q3_quants` for Q3_K), the same weighting of the fit, the same rounding of
sub-block scales to 4/6/8 bits, the same re-quantization against the rounded scales, and the same
bit packing. All of it is vectorised over blocks: a search that ggml runs per block is run here for
all blocks at once, with per-block masks where ggml would branch. Arithmetic is float32, as in ggml.

Byte layouts (QK_K = 256 weights per super-block), matching `block_q*_K` in ggml-common.h:
    Q2_K  84 bytes: scales[16] (4-bit scale | 4-bit min << 4), qs[64] (2-bit), d, dmin (fp16)
    Q3_K 110 bytes: hmask[32] (3rd bit), qs[64] (low 2 bits), scales[12] (16 x 6-bit), d
    Q4_K 144 bytes: d, dmin, scales[12] (8 x 6-bit scale + 8 x 6-bit min), qs[128] (4-bit)
    Q5_K 176 bytes: d, dmin, scales[12], qh[32] (5th bit), qs[128] (low 4 bits)
    Q6_K 210 bytes: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d

Exactness: the sums run in ggml's order too (see `_element_major`), so the bytes are ggml's own:
tests/test_kquants.py pins them to those of `ggml_quantize_chunk` from libggml-base built on x86-64,
where ggml-base (unlike the CPU backend) is compiled without FMA. A build whose compiler fuses
multiply-adds in ggml-quants.c (possible on other targets) may round a few exact ties differently;
the format and the error are the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType, LlamaFileType

Q = GGMLQuantizationType
F32 = np.float32
# ggml treats a group whose largest magnitude is below this as all zeros.
GROUP_MAX_EPS = F32(1e-15)
# Super-blocks quantized per numpy pass: big enough to amortise numpy's per-call overhead, small
# enough (64K floats) that the scale searches' temporaries stay in cache.
_CHUNK_BLOCKS = 256


def _rint(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """ggml's `nearest_int` (round half to even), kept as float32."""
    return np.rint(values, out=out)


def _fp16(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=F32).astype(np.float16)


def _wrap_u8(values: np.ndarray) -> np.ndarray:
    """An int stored into a C uint8_t: modulo 256."""
    return (values.astype(np.int64) & 0xFF).astype(np.uint8)


def _signed_absmax(values: np.ndarray) -> np.ndarray:
    """Per column, the value of largest magnitude, sign kept (the first one on ties, as ggml's loops)."""
    index = np.abs(values).argmax(axis=0)
    return np.take_along_axis(values, index[None, :], axis=0)[0]


def _element_major(blocks: np.ndarray, n: int) -> np.ndarray:
    """(nb, 256) → (n, groups): one column per ggml group of n consecutive values.

    Everything below works on this layout, so that a sum over a group is numpy's reduction along
    axis 0, which adds the rows in order: the same float32 summation order as ggml's loops.
    """
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


def _block_major(columns: np.ndarray, nb: int) -> np.ndarray:
    """(n, groups) → (nb, groups per block, n)."""
    return columns.T.reshape(nb, -1, columns.shape[0])


# --- scale searches (one column of `x` = one ggml group) --------------------------------------------


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization to [-nmax, nmax-1] with weights x², trying 19 scales around -nmax/max.

    ggml's `make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)`. Returns (scale, L + nmax).
    """
    vmax = _signed_absmax(x)
    live = np.abs(vmax) >= GROUP_MAX_EPS
    safe_max = np.where(live, vmax, F32(1))
    w = x * x
    wx = w * x

    def attempt(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        levels = np.clip(_rint(iscale * x), -nmax, nmax - 1)
        return levels, (wx * levels).sum(axis=0), ((w * levels) * levels).sum(axis=0)

    levels, sumlx, suml2 = attempt(F32(-nmax) / safe_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        candidate, sumlx, suml2 = attempt(-(F32(nmax) + F32(0.1) * F32(step)) / safe_max)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = sumlx / suml2
        levels = np.where(better, candidate, levels)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, new_scale * sumlx, best)
    scale = np.where(live, scale, F32(0))
    levels = np.where(live, levels + F32(nmax), F32(0))
    return scale, levels


def _make_qkx2_quants(
    x: np.ndarray,
    weights: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric quantization x ≈ scale·L - min, L in [0, nmax], min >= 0: a weighted least-squares
    fit of (scale, min) on each of nstep+1 trial grids, keeping the best by weighted squared (or, with
    use_mad, absolute) error. Each trial grid is laid from the best min found so far, as ggml's is.

    ggml's `make_qkx2_quants`. Returns (scale, min, L).
    """
    lo = np.minimum(x.min(axis=0), F32(0))
    hi = x.max(axis=0)
    sum_w = weights.sum(axis=0)
    sum_x = (weights * x).sum(axis=0)
    flat = hi == lo  # nothing to fit: L = 0, scale = 0

    # Scratch buffers: the loop below is the hot path, so it allocates nothing of x's size.
    candidate, wl, tmp = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def levels_for(iscale: np.ndarray, offset: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.subtract(x, offset, out=out)
        np.multiply(out, iscale, out=out)
        return np.clip(_rint(out, out=out), 0, nmax, out=out)

    def error(scale: np.ndarray, offset: np.ndarray, levels: np.ndarray) -> np.ndarray:
        diff = np.multiply(levels, scale, out=tmp)
        np.add(diff, offset, out=diff)
        np.subtract(diff, x, out=diff)
        if use_mad:
            np.abs(diff, out=diff)
        else:
            np.multiply(diff, diff, out=diff)
        return np.multiply(diff, weights, out=diff).sum(axis=0)

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(flat, F32(0), F32(nmax) / (hi - lo))
        scale = np.where(flat, F32(0), F32(1) / iscale)
    best = error(scale, lo, levels_for(iscale, lo, candidate))
    # The winning grid is remembered by its (iscale, offset) and laid again at the end.
    win_iscale, win_offset = iscale, lo
    offset = lo
    for step in range(nstep + 1):
        span = hi - offset
        with np.errstate(divide="ignore", invalid="ignore"):
            # A non-positive span (flat group, or a fitted min at the top): ggml's grid is then all
            # zeros, which never wins; a zero iscale gives the same.
            iscale = np.where(span > 0, (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span, F32(0))
        levels_for(iscale, offset, candidate)
        np.multiply(weights, candidate, out=wl)
        sum_l = wl.sum(axis=0)
        sum_l2 = np.multiply(wl, candidate, out=tmp).sum(axis=0)
        sum_xl = np.multiply(wl, x, out=tmp).sum(axis=0)
        det = sum_w * sum_l2 - sum_l * sum_l
        fits = det > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0  # the offset may only lower values: refit the scale alone
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(fits, this_scale, F32(0))
        this_min = np.where(fits, this_min, F32(0))
        current = error(this_scale, this_min, candidate)
        better = fits & (current < best)
        win_iscale = np.where(better, iscale, win_iscale)
        win_offset = np.where(better, offset, win_offset)
        best = np.where(better, current, best)
        scale = np.where(better, this_scale, scale)
        offset = np.where(better, this_min, offset)
    return scale, -offset, levels_for(win_iscale, win_offset, candidate)


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization to [-nmax, nmax-1] from -nmax/max, then up to 5 passes of coordinate
    descent on the x²-weighted fit, one element at a time, taking a new level only when it improves
    the fit. ggml's `make_q3_quants(n, nmax, x, L, do_rmse=true)`. Returns (scale, L + nmax)."""
    vmax = _signed_absmax(x)
    live = np.abs(vmax) >= GROUP_MAX_EPS
    safe_max = np.where(live, vmax, F32(1))
    levels = np.clip(_rint((F32(-nmax) / safe_max) * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = (wx * levels).sum(axis=0)
    suml2 = ((w * levels) * levels).sum(axis=0)
    for _ in range(5):  # a pass that changes nothing leaves the state as it was: no early exit needed
        for i in range(x.shape[0]):
            xi, wi, wxi, li = x[i], w[i], wx[i], levels[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            with np.errstate(divide="ignore", invalid="ignore"):
                new = np.clip(_rint(np.where(slx > 0, (xi * sl2) / slx, F32(0))), -nmax, nmax - 1)
            new_slx = slx + wxi * new
            new_sl2 = sl2 + (wi * new) * new
            accept = (
                (slx > 0)
                & (new != li)
                & (new_sl2 > 0)
                & (new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2)
            )
            levels[i] = np.where(accept, new, li)
            sumlx = np.where(accept, new_slx, sumlx)
            suml2 = np.where(accept, new_sl2, suml2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(live & (suml2 > 0), sumlx / suml2, F32(0))
    levels = np.where(live, levels + F32(nmax), F32(0))
    return scale, levels


# --- packing helpers --------------------------------------------------------------------------------


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins into 12 bytes (ggml's `get_scale_min_k4` layout)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    return np.concatenate(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
        ],
        axis=1,
    )


def _pack_2bit(levels: np.ndarray) -> np.ndarray:
    """(nb, 256) values < 4 → 64 bytes: per 128-half, byte l holds elements l, l+32, l+64, l+96."""
    q = levels.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_bit_planes(bits: np.ndarray) -> np.ndarray:
    """(nb, 256) of 0/1 → 32 bytes: bit k of byte m is element 32k + m (Q3_K's hmask, Q5_K's qh)."""
    planes = bits.astype(np.uint8).reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]
    return np.bitwise_or.reduce(planes, axis=1)


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


# --- block quantizers: (nb, 256) float32 → (nb, type_size) uint8 ------------------------------------


def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """16 sub-blocks of 16: x ≈ d·scale·(q - 32), q 6-bit, scale int8."""
    nb = blocks.shape[0]
    scales, levels = _make_qx_quants(_element_major(blocks, 16), nmax=32)
    scales, levels = scales.reshape(nb, 16), _block_major(levels, nb)
    x = blocks.reshape(nb, 16, 16)

    max_scale = _signed_absmax(scales.T)
    live = np.abs(max_scale) >= GROUP_MAX_EPS  # else ggml writes an all-zero block
    with np.errstate(divide="ignore"):
        iscale = np.where(live, F32(-128) / np.where(live, max_scale, F32(1)), F32(0))
        d = _fp16(np.where(live, F32(1) / iscale, F32(0)))
    sub_scales = np.where(live[:, None], np.minimum(F32(127), _rint(iscale[:, None] * scales)), F32(0))

    sub_d = d.astype(F32)[:, None] * sub_scales
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_rint(x / sub_d[:, :, None]), -32, 31) + F32(32)
    levels = np.where((sub_d != 0)[:, :, None], requant, levels)
    levels = np.where(live[:, None, None], levels, F32(0))

    q = levels.astype(np.uint8).reshape(nb, 2, 4, 32)
    low, high = q & 0xF, q >> 4
    ql = np.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate(
        [
            ql.reshape(nb, 128),
            qh.reshape(nb, 64),
            sub_scales.astype(np.int8).view(np.uint8),
            _fp16_bytes(d),
        ],
        axis=1,
    )


def _quantize_q45_k(blocks: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K (bits=4) and Q5_K (bits=5): 8 sub-blocks of 32, x ≈ d·scale·q - dmin·min, 6-bit scale/min."""
    nb = blocks.shape[0]
    nmax = (1 << bits) - 1
    x = _element_major(blocks, 32)
    av_x = np.sqrt((x * x).sum(axis=0) / F32(32))
    weights = av_x + np.abs(x)
    if bits == 4:
        scales, mins, levels = _make_qkx2_quants(x, weights, nmax, -1.0, 0.1, 20, use_mad=False)
    else:
        scales, mins, levels = _make_qkx2_quants(x, weights, nmax, -0.5, 0.1, 15, use_mad=False)
    scales, mins, levels = scales.reshape(nb, 8), mins.reshape(nb, 8), _block_major(levels, nb)
    x = blocks.reshape(nb, 8, 32)

    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(_wrap_u8(_rint(inv_scale[:, None] * scales)), 63)
    lm = np.minimum(_wrap_u8(_rint(inv_min[:, None] * mins)), 63)
    d, dmin = _fp16(max_scale / F32(63)), _fp16(max_min / F32(63))

    sub_d = d.astype(F32)[:, None] * ls.astype(F32)
    sub_m = dmin.astype(F32)[:, None] * lm.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_rint((x + sub_m[:, :, None]) / sub_d[:, :, None]), 0, nmax)
    levels = np.where((sub_d != 0)[:, :, None], requant, levels)

    q = levels.astype(np.uint8).reshape(nb, 4, 2, 32)
    low = q & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    parts = [_fp16_bytes(d), _fp16_bytes(dmin), _pack_scale_min_k4(ls, lm)]
    if bits == 5:
        parts.append(_pack_bit_planes((q >> 4).reshape(nb, 256)))
    parts.append(qs)
    return np.concatenate(parts, axis=1)


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    return _quantize_q45_k(blocks, bits=4)


def _quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    return _quantize_q45_k(blocks, bits=5)


def _quantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """16 sub-blocks of 16: x ≈ d·(scale - 32)·(q - 4), q 3-bit (2 low bits + high-bit mask), 6-bit scale."""
    nb = blocks.shape[0]
    scales, levels = _make_q3_quants(_element_major(blocks, 16), nmax=4)
    scales, levels = scales.reshape(nb, 16), _block_major(levels, nb)
    x = blocks.reshape(nb, 16, 16)

    max_scale = _signed_absmax(scales.T)
    live = max_scale != 0  # else scales and d stay zero and the first-pass levels are kept
    with np.errstate(divide="ignore"):
        iscale = np.where(live, F32(-32) / np.where(live, max_scale, F32(1)), F32(0))
        d = _fp16(np.where(live, F32(1) / iscale, F32(0)))
    ls = np.where(live[:, None], np.clip(_rint(iscale[:, None] * scales), -32, 31) + F32(32), F32(0))

    sub_d = d.astype(F32)[:, None] * (ls - F32(32))
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_rint(x / sub_d[:, :, None]), -4, 3) + F32(4)
    levels = np.where((sub_d != 0)[:, :, None], requant, levels)

    q = levels.astype(np.uint8).reshape(nb, 256)
    l6 = ls.astype(np.uint8)
    low = l6 & 0xF
    top = ((l6 >> 4) & 3).reshape(nb, 4, 4)  # [j // 4, j % 4]
    packed_scales = np.concatenate(
        [
            low[:, :8] | (low[:, 8:] << 4),
            top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6),
        ],
        axis=1,
    )
    return np.concatenate(
        [_pack_bit_planes((q >> 2) & 1), _pack_2bit(q & 3), packed_scales, _fp16_bytes(d)], axis=1
    )


def _quantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    """16 sub-blocks of 16: x ≈ d·scale·q - dmin·min, q 2-bit, 4-bit scale and min."""
    nb = blocks.shape[0]
    x = _element_major(blocks, 16)
    scales, mins, levels = _make_qkx2_quants(x, np.abs(x), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins, levels = scales.reshape(nb, 16), mins.reshape(nb, 16), _block_major(levels, nb)
    x = blocks.reshape(nb, 16, 16)

    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(15) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(15) / max_min, F32(0))
    packed_scales = _wrap_u8(_rint(inv_scale[:, None] * scales)) | (
        _wrap_u8(_rint(inv_min[:, None] * mins)) << 4
    )
    d, dmin = _fp16(max_scale / F32(15)), _fp16(max_min / F32(15))

    sub_d = d.astype(F32)[:, None] * (packed_scales & 0xF).astype(F32)
    sub_m = dmin.astype(F32)[:, None] * (packed_scales >> 4).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_rint((x + sub_m[:, :, None]) / sub_d[:, :, None]), 0, 3)
    levels = np.where((sub_d != 0)[:, :, None], requant, levels)
    return np.concatenate(
        [packed_scales, _pack_2bit(levels.reshape(nb, 256)), _fp16_bytes(d), _fp16_bytes(dmin)], axis=1
    )


_QUANTIZERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    Q.Q2_K: _quantize_q2_k,
    Q.Q3_K: _quantize_q3_k,
    Q.Q4_K: _quantize_q4_k,
    Q.Q5_K: _quantize_q5_k,
    Q.Q6_K: _quantize_q6_k,
}
K_QUANT_TYPES = frozenset(_QUANTIZERS)


def quantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`data` (rows of a multiple of 256 values) as GGUF bytes of K-quant `qtype`: a uint8 array shaped
    (*data.shape[:-1], bytes per row), which is what `GGUFWriter.add_tensor(..., raw_dtype=qtype)` and
    `gguf.quants.dequantize(..., qtype)` take."""
    if qtype not in _QUANTIZERS:
        raise ValueError(f"{qtype.name} is not a K-quant this module writes")
    data = np.asarray(data, dtype=F32)
    if data.ndim == 0 or data.shape[-1] % QK_K != 0:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {QK_K} values, got shape {data.shape}")
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = data.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    quantize_blocks = _QUANTIZERS[qtype]
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        chunk = blocks[start : start + _CHUNK_BLOCKS]
        out[start : start + len(chunk)] = quantize_blocks(chunk)
    return out.reshape(*data.shape[:-1], data.shape[-1] // QK_K * type_size)


# --- llama-quantize's tensor type mixes -------------------------------------------------------------

_LAYER = re.compile(r"blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, every third between."""
    if i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8:
        return True
    return (i_layer - n_layer // 8) % 3 == 2  # left operand >= 0 here, so C's % and Python's agree


def _fallback(qtype: GGMLQuantizationType, ncols: int) -> GGMLQuantizationType:
    """llama.cpp's substitute for a type whose blocks do not divide the row (`tensor_type_fallback`),
    and f16 when the substitute's 32-wide blocks do not either."""
    block, _ = GGML_QUANT_SIZES[qtype]
    if ncols % block == 0:
        return qtype
    substitute = {
        Q.Q2_K: Q.Q4_0,
        Q.Q3_K: Q.Q4_0,
        Q.Q4_K: Q.Q5_0,
        Q.Q5_K: Q.Q5_1,
        Q.Q6_K: Q.Q8_0,
    }.get(qtype, qtype)
    if ncols % GGML_QUANT_SIZES[substitute][0] != 0:
        return Q.F16
    return substitute


def mix_tensor_type(
    file_type: LlamaFileType,
    default_type: GGMLQuantizationType,
    name: str,
    ncols: int,
    n_layer: int,
    n_gqa: int,
    has_output: bool,
) -> GGMLQuantizationType:
    """The type llama-quantize (no importance matrix, no overrides) gives a 2-D weight `name` with rows
    of `ncols` values when making `file_type` whose bulk type is `default_type`.

    From llama.cpp's `llama_tensor_get_type`, for dense (non-MoE, non-Falcon) models:
    - output.weight, and token_embd.weight when there is no output.weight (tied embeddings): Q6_K, or
      Q8_0 when the rows do not split into the bulk type's blocks (Q8_0 files keep Q8_0);
    - attn_v: Q2_K → Q4_K if n_gqa >= 4 else Q3_K; Q3_K_M → Q5_K in the first 2 layers, else Q4_K;
      Q4_K_M and Q5_K_M → Q6_K in `use_more_bits` layers;
    - ffn_down: Q2_K → Q3_K; Q3_K_M → Q5_K in the first n/16 layers, else Q4_K; Q4_K_M and Q5_K_M →
      Q6_K in `use_more_bits` layers;
    - attn_output: Q2_K → Q3_K; Q3_K_M → Q4_K;
    - everything else (attn_q, attn_k, ffn_gate, ffn_up, untied token_embd): the bulk type;
    then a type whose blocks do not divide the row falls back: Q2_K/Q3_K → Q4_0, Q4_K → Q5_0,
    Q5_K → Q5_1, Q6_K → Q8_0, and f16 when not even 32 divides it. (Norms and biases are 1-D and are
    not passed here: they stay f32.) llama.cpp's extra rules for 70B and 8-expert models are not
    reproduced (the architectures exported here are dense, and 70B is out of this exporter's scope),
    nor are the rules of the file types it does not offer (the _S and _L mixes, i-quants).
    """
    F = LlamaFileType
    new_type = default_type
    match = _LAYER.match(name)
    i_layer = int(match.group(1)) if match else 0
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        if ncols % GGML_QUANT_SIZES[default_type][0] != 0:
            new_type = Q.Q8_0
        elif default_type != Q.Q8_0:
            new_type = Q.Q6_K
    elif "attn_v.weight" in name:
        if file_type == F.MOSTLY_Q2_K:
            new_type = Q.Q4_K if n_gqa >= 4 else Q.Q3_K
        elif file_type == F.MOSTLY_Q3_K_M:
            new_type = Q.Q5_K if i_layer < 2 else Q.Q4_K
        elif file_type in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(i_layer, n_layer):
            new_type = Q.Q6_K
    elif "ffn_down" in name:
        if file_type == F.MOSTLY_Q2_K:
            new_type = Q.Q3_K
        elif file_type == F.MOSTLY_Q3_K_M:
            new_type = Q.Q5_K if i_layer < n_layer // 16 else Q.Q4_K
        elif file_type in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(i_layer, n_layer):
            new_type = Q.Q6_K
    elif "attn_output.weight" in name:
        if file_type == F.MOSTLY_Q2_K:
            new_type = Q.Q3_K
        elif file_type == F.MOSTLY_Q3_K_M:
            new_type = Q.Q4_K
    return _fallback(new_type, ncols)
