"""Blockwise affine quantization of linear weights (int4, int8), in numpy: the one quantizer every backend uses.

The scheme is MLX's ``mx.quantize(w, group_size, bits)`` in its "affine" mode, matched bit for bit (packed
integers, scales and biases), so a checkpoint quantized here is an mlx-lm checkpoint and the three backends
compute with the same numbers. Each row of W [out, in] is cut into groups of ``group_size`` consecutive
inputs (32, 64 or 128); each group g gets a scale s_g and a bias b_g, each weight a code q in [0, 2^bits - 1]:

    w ~ s_g * q + b_g

How MLX picks s and b (mlx/backend/cpu/quantized.cpp, ``quantize``; its graph fallback in mlx/ops.cpp
computes the same), every step in float32 on the group's values widened to float32:

    n_bins = 2^bits - 1;  lo, hi = min(group), max(group)
    s = max((hi - lo) / n_bins, 1e-7)
    the edge of larger magnitude is kept exact: if |lo| > |hi|: edge = lo, else edge = hi and s = -s
    q0 = rint(edge / s)                          (rint: round half to even)
    if q0 != 0: s = edge / q0, b = edge          (the edge is the code 0: b = edge exactly)
    else:       b = 0                            (the edge is within half a step of 0)
    q = clip(rint((w - b) / s), 0, n_bins)       (with the float32 s and b, before they are rounded)

so s is negative when the maximum is the edge (codes then count down from it). s and b are stored in the
weight's dtype (float32, bfloat16 or float16), rounded to nearest even. Codes are packed into uint32 words
from the least significant bits up: 32 / bits codes per word, code j of a word at bits [j*bits, (j+1)*bits),
words in row order, so packed is [out, in * bits / 32].

Dequantizing (``mx.dequantize``) is ``s * q + b`` in the weights' dtype, rounded after the product and after
the sum (two roundings in bfloat16/float16; in float32 the product and the sum are each float32 operations).

``quantize`` and ``dequantize`` here equal ``mx.quantize`` and ``mx.dequantize`` exactly for every finite
weight (tests/test_quantize.py checks random and adversarial groups at every bits x group size, in float32,
bfloat16 and float16). Non-finite weights, and groups whose range overflows float32, are refused.
"""

from __future__ import annotations

import numpy as np

from .checks import is_count
from .dtypes import canonical_dtype, numpy_dtype
from .errors import InputError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
_EPS = np.float32(1e-7)  # MLX's floor on the step: a constant group still gets a non-zero scale
_FLOATS = tuple(numpy_dtype(name) for name in ("float32", "bfloat16", "float16"))
_CHUNK = 1 << 22  # weights quantized at a time: bounds the float32 working copies of a large matrix


def check_options(bits: object, group_size: object) -> tuple[int, int]:
    """``(bits, group_size)`` as ints, or an InputError naming the allowed values."""
    if not is_count(bits) or int(bits) not in BITS:
        raise InputError(f"quantization bits must be 4 or 8, got {bits!r}")
    if not is_count(group_size) or int(group_size) not in GROUP_SIZES:
        raise InputError(f"quantization group size must be 32, 64 or 128, got {group_size!r}")
    return int(bits), int(group_size)


def check_shape(shape: tuple[int, ...], bits: object, group_size: object) -> tuple[int, int]:
    """Check that a weight of ``shape`` [out, in] can be quantized with these options; returns
    ``(bits, group_size)``. The input features must split into whole groups."""
    bits, group_size = check_options(bits, group_size)
    if len(shape) != 2:
        raise InputError(f"only a matrix [out, in] can be quantized, got shape {tuple(shape)}")
    out_features, in_features = shape
    if in_features % group_size:
        fits = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = f"use group size {' or '.join(map(str, fits))}" if fits else "no group size (32, 64, 128) divides it"
        raise InputError(
            f"a weight [{out_features}, {in_features}] cannot be quantized in groups of {group_size}: its "
            f"{in_features} input features are not a multiple of {group_size}; {hint}"
        )
    return bits, group_size


def quantized_shapes(out_features: int, in_features: int, bits: int, group_size: int) -> dict[str, tuple[int, int]]:
    """The shapes ``quantize`` gives for a weight [out_features, in_features]: packed, scales, biases."""
    bits, group_size = check_shape((out_features, in_features), bits, group_size)
    groups = (out_features, in_features // group_size)
    return {"weight": (out_features, in_features * bits // 32), "scales": groups, "biases": groups}


def quantize(weight: np.ndarray, bits: int = 4, group_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(packed, scales, biases)`` of ``weight`` [out, in] (float32, bfloat16 or float16): packed uint32
    [out, in * bits / 32], scales and biases [out, in / group_size] in the weight's dtype; equal to
    ``mx.quantize(weight, group_size, bits)`` bit for bit (the module docstring gives the formula)."""
    weight = np.asarray(weight)
    bits, group_size = check_shape(weight.shape, bits, group_size)
    if weight.dtype not in _FLOATS:
        raise InputError(f"weights to quantize must be float32, bfloat16 or float16, got {weight.dtype}")
    out_features, in_features = weight.shape
    shapes = quantized_shapes(out_features, in_features, bits, group_size)
    packed = np.empty(shapes["weight"], np.uint32)
    scales = np.empty(shapes["scales"], weight.dtype)
    biases = np.empty(shapes["biases"], weight.dtype)
    rows = max(1, _CHUNK // max(in_features, 1))
    for start in range(0, out_features, rows):
        part = slice(start, start + rows)
        packed[part], scales[part], biases[part] = _quantize_rows(weight[part], bits, group_size)
    return packed, scales, biases


def _quantize_rows(weight: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    count = weight.shape[0]
    groups = weight.astype(np.float32).reshape(count, -1, group_size)  # [rows, in / g, g]
    if not np.isfinite(groups).all():
        raise InputError("weights to quantize must be finite: this matrix holds inf or NaN")
    n_bins = np.float32((1 << bits) - 1)
    high, low = groups.max(-1), groups.min(-1)
    with np.errstate(over="ignore"):
        spread = high - low
    if not np.isfinite(spread).all():
        raise InputError("a group of weights spans more than float32's range (max - min overflows): rescale the weights")
    low_is_edge = np.abs(low) > np.abs(high)
    scale = np.maximum(spread / n_bins, _EPS)
    scale = np.where(low_is_edge, scale, -scale)
    edge = np.where(low_is_edge, low, high)
    q0 = np.rint(edge / scale)
    moved = q0 != 0
    scale = np.where(moved, np.divide(edge, q0, out=np.ones_like(edge), where=moved), scale)
    bias = np.where(moved, edge, np.float32(0))
    codes = np.rint((groups - bias[..., None]) / scale[..., None])
    codes = np.clip(codes, 0, n_bins).astype(np.uint32).reshape(count, -1)
    return pack(codes, bits), scale.astype(weight.dtype), bias.astype(weight.dtype)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [out, in] (integers in [0, 2^bits)) packed into uint32 [out, in * bits / 32], MLX's order: code j
    of each word at bits [j*bits, (j+1)*bits)."""
    per_word = 32 // bits
    codes = np.asarray(codes).astype(np.uint32).reshape(codes.shape[0], -1, per_word)
    shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(bits))
    return np.bitwise_or.reduce(codes << shifts, axis=-1).astype(np.uint32)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """The codes of ``packed`` uint32 [out, words] as uint8 [out, words * 32 / bits] (``pack`` undone)."""
    per_word = 32 // bits
    packed = np.asarray(packed, np.uint32)
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(bits)
    codes = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1).astype(np.uint8)


def check_arrays(packed: object, scales: object, biases: object, bits: object, group_size: object) -> tuple[int, int]:
    """``(out_features, in_features)`` of the weight that quantized arrays represent (what ``quantize`` gives:
    packed uint32 [out, in * bits / 32], scales and biases [out, in / group_size] sharing a float dtype), or
    an InputError naming what does not fit ``bits`` and ``group_size``. Reads shapes and dtypes only."""
    bits, group_size = check_options(bits, group_size)
    shape, dtype = tuple(np.shape(packed)), getattr(packed, "dtype", None)
    if len(shape) != 2 or dtype != np.uint32:
        raise InputError(f"packed weights must be a uint32 matrix [out, in * bits / 32], got {dtype} {shape}")
    out_features, in_features = shape[0], shape[1] * 32 // bits
    groups = (out_features, in_features // group_size)
    if in_features % group_size or tuple(np.shape(scales)) != groups or tuple(np.shape(biases)) != groups:
        raise InputError(
            f"scales and biases of a [{out_features}, {in_features}] weight in groups of {group_size} must be "
            f"{list(groups)}, got {list(np.shape(scales))} and {list(np.shape(biases))}: check bits and group_size"
        )
    scales_dtype, biases_dtype = getattr(scales, "dtype", None), getattr(biases, "dtype", None)
    if scales_dtype not in _FLOATS or biases_dtype != scales_dtype:
        raise InputError(
            f"scales and biases must share one dtype of float32, bfloat16, float16; got {scales_dtype}, {biases_dtype}"
        )
    return out_features, in_features


def checked_arrays(
    packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: object, group_size: object,
    dtype: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """``(packed, scales, biases, bits, group_size)`` checked by ``check_arrays``, as contiguous numpy, the
    scales and biases cast to ``dtype`` (a gemmalab dtype name: exact when it widens them; None keeps
    theirs): what each backend's ``QuantizedLinear.from_arrays`` builds from, re-quantizing nothing."""
    bits, group_size = check_options(bits, group_size)
    packed, scales, biases = (np.ascontiguousarray(a) for a in (packed, scales, biases))
    check_arrays(packed, scales, biases, bits, group_size)
    if dtype is not None:
        target = numpy_dtype(canonical_dtype(dtype))
        scales, biases = scales.astype(target, copy=False), biases.astype(target, copy=False)
    return packed, scales, biases, bits, group_size


def dequantize(
    packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int = 4, group_size: int = 64
) -> np.ndarray:
    """The weight [out, in] that ``(packed, scales, biases)`` represent, in the scales' dtype: ``s * q + b``
    rounded to that dtype after the product and after the sum; equal to ``mx.dequantize``."""
    bits, group_size = check_options(bits, group_size)
    packed, scales, biases = np.asarray(packed), np.asarray(scales), np.asarray(biases)
    out_features, in_features = check_arrays(packed, scales, biases, bits, group_size)
    codes = unpack(packed, bits).reshape(out_features, -1, group_size)
    return dequantize_codes(codes, scales, biases).reshape(out_features, in_features)


def dequantize_codes(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """``s * q + b`` for codes [..., groups, g] and scales, biases [..., groups], in the scales' dtype with
    MLX's two roundings. The product of a code (< 256) and a bfloat16 or float16 scale is exact in float32,
    so rounding it once to the dtype is the dtype's own multiplication; the sum likewise."""
    dtype = scales.dtype
    product = (codes.astype(np.float32) * scales.astype(np.float32)[..., None]).astype(dtype)
    return (product.astype(np.float32) + biases.astype(np.float32)[..., None]).astype(dtype)


__all__ = [
    "BITS",
    "GROUP_SIZES",
    "check_arrays",
    "check_options",
    "check_shape",
    "checked_arrays",
    "dequantize",
    "dequantize_codes",
    "pack",
    "quantize",
    "quantized_shapes",
    "unpack",
]
