"""The quantized linear (blockwise affine int4 / int8) of the MLX backend: a linears.Wrapper.

The weight is quantized once by the core's numpy quantizer (gemmalab.quantize, equal to ``mx.quantize``
bit for bit) and multiplied by MLX's own kernel, ``mx.quantized_matmul``, which reads the packed codes
directly (on the CPU device a bfloat16 / float16 model calls its float32 form: MLX's CPU kernel accumulates
half-precision products in half precision, see ``__call__``). The wrapper's arrays carry mlx-lm's ``QuantizedLinear`` names and layout (``weight`` packed uint32
[out, in * bits / 32], ``scales`` and ``biases`` [out, in / group_size] in the model's dtype), so an mlx-lm
checkpoint is a key map away. It keeps no dense copy of the weight: ``fuse`` dequantizes
(``mx.dequantize``, equal to gemmalab.quantize.dequantize).

``QUANTIZED`` maps the core's wrapper name to the class (the lead wires it into wrappers.WRAPPERS).
"""

from __future__ import annotations

import ml_dtypes
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from gemmalab.errors import InputError
from gemmalab.quantize import check_shape, checked_arrays, quantize

from .linears import Wrapper

_BF16 = np.dtype(ml_dtypes.bfloat16)


def _host(array: mx.array) -> np.ndarray:
    """An MLX float array as numpy (bfloat16 as ml_dtypes.bfloat16: numpy's buffer protocol has none)."""
    if array.dtype == mx.bfloat16:
        return np.array(array.view(mx.uint16)).view(_BF16)
    return np.array(array)


def _exact(array: np.ndarray) -> mx.array:
    """A float32, float16 or bfloat16 numpy array as an MLX array of the same dtype, bit for bit."""
    if array.dtype == _BF16:
        return mx.array(array.view(np.uint16)).view(mx.bfloat16)
    return mx.array(array)


def _device(array: np.ndarray, dtype: mx.Dtype) -> mx.array:
    if array.dtype == _BF16:
        return mx.array(array.view(np.uint16)).view(mx.bfloat16)
    return mx.array(array).astype(dtype)


class QuantizedLinear(Wrapper):
    """A linear whose weight is stored blockwise-affine quantized: ``y = x @ dequantize(weight).T``,
    computed by ``mx.quantized_matmul``. Its arrays: ``weight`` (packed uint32), ``scales``, ``biases``
    (mlx-lm's names); they are frozen (``freeze``): no gradient reaches them."""

    def __init__(self, weight: mx.array, scales: mx.array, biases: mx.array, *, bits: int, group_size: int):
        super().__init__()
        self.weight = weight  # uint32 [out, in * bits / 32]
        self.scales = scales  # [out, in / group_size], the model's dtype
        self.biases = biases  # [out, in / group_size]
        self.bits = bits
        self.group_size = group_size
        self.mode = "affine"  # mlx-lm's QuantizedLinear attribute (mx.quantize's mode)
        self.freeze()

    @classmethod
    def from_base(cls, base: nn.Module, *, bits: int = 4, group_size: int = 64) -> QuantizedLinear:
        """Quantize the weight of ``base`` (an ``nn.Linear`` without bias) with gemmalab.quantize.quantize;
        scales and biases in the weight's dtype."""
        if not isinstance(base, nn.Linear) or "bias" in base:
            raise InputError(f"QuantizedLinear wraps a plain linear (nn.Linear without bias), got {type(base).__name__}")
        weight = base.weight
        bits, group_size = check_shape(tuple(weight.shape), bits, group_size)
        packed, scales, biases = quantize(_host(weight), bits, group_size)
        return cls(mx.array(packed), _device(scales, weight.dtype), _device(biases, weight.dtype),
                   bits=bits, group_size=group_size)

    @classmethod
    def from_arrays(
        cls, packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, *, bits: int, group_size: int,
        dtype: str | None = None,
    ) -> QuantizedLinear:
        """The wrapper holding exactly these numbers, re-quantizing nothing: mlx-lm's QuantizedLinear arrays
        as numpy (packed uint32 [out, in * bits / 32], scales and biases [out, in / group_size]), e.g. a
        quantized checkpoint's (gemmalab.checkpoint.Weights.quantized_arrays). ``dtype`` (a gemmalab dtype
        name) casts the scales and biases to the model's dtype; default: theirs. No dense weight is made."""
        packed, scales, biases, bits, group_size = checked_arrays(packed, scales, biases, bits, group_size, dtype)
        return cls(mx.array(packed), _exact(scales), _exact(biases), bits=bits, group_size=group_size)

    def __call__(self, x: mx.array) -> mx.array:
        scales, biases = self.scales, self.biases
        if x.dtype != mx.float32 and mx.default_device().type == mx.DeviceType.cpu:
            # MLX's CPU kernel accumulates bfloat16 / float16 products in that dtype (its SIMD float32 path
            # is taken for float32 only): 8% relative error at 4096 inputs. Run the float32 kernel on the
            # same codes instead (scales and biases widened exactly), rounding the output once.
            out = mx.quantized_matmul(
                x.astype(mx.float32), self.weight, scales=scales.astype(mx.float32),
                biases=biases.astype(mx.float32), transpose=True, group_size=self.group_size, bits=self.bits,
            )
            return out.astype(x.dtype)
        return mx.quantized_matmul(
            x, self.weight, scales=scales, biases=biases, transpose=True, group_size=self.group_size, bits=self.bits
        )

    def fuse(self) -> mx.array:
        """The dequantized weight [out, in] in the scales' dtype (``mx.dequantize``; no gradient)."""
        return mx.stop_gradient(mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def _extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}"


QUANTIZED: dict[str, type[Wrapper]] = {"quantized": QuantizedLinear}

__all__ = ["QUANTIZED", "QuantizedLinear"]
