"""The quantized linear (blockwise affine int4 / int8) of the JAX backend: a linears.Wrapper pytree node.

The weight is quantized once by the core's numpy quantizer (gemmalab.quantize, equal to MLX's
``mx.quantize``) and kept in MLX's layout as the node's children: ``weight`` packed uint32
[out, in * bits / 32], ``scales`` and ``biases`` [out, in / group_size] in the model's dtype; ``bits`` and
``group_size`` are static (part of jit's cache key). Each call dequantizes (shifts and masks, then
``s * q + b`` with gemmalab.quantize.dequantize's roundings) and multiplies: inside the jitted forward and
the jitted cached step XLA fuses the dequantization into the computation, so only the packed integers
are read from memory and no dense weight is kept between calls (outside jit, each call materialises the
dense weight of one linear for the duration of its matmul).

Frozen: the packed integers have no gradient, and ``stop_gradient`` keeps gradients out of the scales and
biases; the gradient reaches the layer's input.

``QUANTIZED`` maps the core's wrapper name to the class (the lead wires it into wrappers.WRAPPERS).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmalab.errors import InputError
from gemmalab.quantize import check_shape, checked_arrays, quantize, quantized_shapes

from .linears import Wrapper, static_field, wrapper


def dequantize(packed: jax.Array, scales: jax.Array, biases: jax.Array, bits: int, group_size: int) -> jax.Array:
    """The weight [out, in] of MLX-layout ``(packed, scales, biases)`` in the scales' dtype: codes unpacked
    from the low bits up, then ``s * q + b`` computed in float32 and rounded to the dtype after the product
    and after the sum (gemmalab.quantize.dequantize_codes: the same numbers as ``mx.dequantize``)."""
    out_features, words = packed.shape
    per_word = 32 // bits
    shifts = jnp.arange(per_word, dtype=jnp.uint32) * jnp.uint32(bits)
    codes = (packed[..., None] >> shifts) & jnp.uint32((1 << bits) - 1)  # [out, words, per_word]
    codes = codes.reshape(out_features, -1, group_size).astype(jnp.float32)  # [out, in / g, g]
    dtype = scales.dtype
    product = (codes * scales.astype(jnp.float32)[..., None]).astype(dtype)
    weight = (product.astype(jnp.float32) + biases.astype(jnp.float32)[..., None]).astype(dtype)
    return weight.reshape(out_features, words * per_word)


@wrapper
class QuantizedLinear(Wrapper):
    """A linear whose weight is stored blockwise-affine quantized: ``y = x @ dequantize(...).T``, the
    dequantization traced into the caller's jit. Its arrays: ``weight`` (packed uint32), ``scales``,
    ``biases`` (MLX's names and layout)."""

    weight: jax.Array  # uint32 [out, in * bits / 32]
    scales: jax.Array  # [out, in / group_size], the model's dtype
    biases: jax.Array  # [out, in / group_size]
    bits: int = static_field()
    group_size: int = static_field()

    @classmethod
    def from_base(cls, base: Any, *, bits: int = 4, group_size: int = 64) -> QuantizedLinear:
        """Quantize the plain leaf ``{"weight": W}`` with gemmalab.quantize.quantize; scales and biases in
        W's dtype. On a shape-only model (W abstract, traced by the walker's ``jax.eval_shape``) it only
        makes arrays of the right shapes."""
        if not isinstance(base, dict) or set(base) != {"weight"} or len(base["weight"].shape) != 2:
            raise InputError(f"QuantizedLinear wraps a plain linear leaf {{'weight': [out, in]}}, got {type(base).__name__}")
        weight = base["weight"]
        out_features, in_features = weight.shape
        bits, group_size = check_shape((out_features, in_features), bits, group_size)
        if isinstance(weight, jax.core.Tracer | jax.ShapeDtypeStruct):  # shape-only: nothing to quantize
            shapes = quantized_shapes(out_features, in_features, bits, group_size)
            return cls(weight=jnp.zeros(shapes["weight"], jnp.uint32), scales=jnp.zeros(shapes["scales"], weight.dtype),
                       biases=jnp.zeros(shapes["biases"], weight.dtype), bits=bits, group_size=group_size)
        packed, scales, biases = quantize(np.asarray(weight), bits, group_size)
        return cls(weight=jnp.asarray(packed), scales=jnp.asarray(scales), biases=jnp.asarray(biases),
                   bits=bits, group_size=group_size)

    @classmethod
    def from_arrays(
        cls, packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, *, bits: int, group_size: int,
        dtype: str | None = None,
    ) -> QuantizedLinear:
        """The wrapper holding exactly these numbers, re-quantizing nothing: MLX-layout arrays as numpy
        (packed uint32 [out, in * bits / 32], scales and biases [out, in / group_size]), e.g. a quantized
        checkpoint's (gemmalab.checkpoint.Weights.quantized_arrays). ``dtype`` (a gemmalab dtype name) casts
        the scales and biases to the model's dtype; default: theirs. No dense weight is made."""
        packed, scales, biases, bits, group_size = checked_arrays(packed, scales, biases, bits, group_size, dtype)
        return cls(weight=jnp.asarray(packed), scales=jnp.asarray(scales), biases=jnp.asarray(biases),
                   bits=bits, group_size=group_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.fuse().T

    def fuse(self) -> jax.Array:
        """The dequantized weight [out, in] in the model's dtype (no gradient into the quantized numbers)."""
        scales, biases = jax.lax.stop_gradient(self.scales), jax.lax.stop_gradient(self.biases)
        return dequantize(self.weight, scales, biases, self.bits, self.group_size)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


QUANTIZED: dict[str, type[Wrapper]] = {"quantized": QuantizedLinear}

__all__ = ["QUANTIZED", "QuantizedLinear", "dequantize"]
