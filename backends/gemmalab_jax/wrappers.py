"""Wrappers of linear layers (linears.Wrapper), applied by the walker in linears.py.

``WRAPPERS`` maps the core's wrapper names (gemmalab.linears.WRAPPER_KINDS) to the classes; each class's
merge rule is written in numpy in gemmalab/linears.py, the specification ``fuse`` follows.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmalab.errors import InputError
from gemmalab.linears import output_scale_init
from gemmalab.lora import check_lora_arrays

from .linears import Wrapper, static_field, wrapper
from .quantized import QUANTIZED


def _plain_leaf(base: Any, name: str) -> dict[str, Any]:
    if not isinstance(base, dict) or set(base) != {"weight"} or len(base["weight"].shape) != 2:
        raise InputError(f"{name} wraps a plain linear leaf {{'weight': [out, in]}}, got {type(base).__name__}")
    return base


@wrapper
class OutputScale(Wrapper):
    """A learned per-output-feature scale s [out] on a linear: ``y = s * (x @ W.T)``; fuses into the dense
    weight ``s[:, None] * W`` (gemmalab.linears.output_scale). Its arrays: ``scale`` and the wrapped
    ``base.weight``."""

    base: dict[str, jax.Array]  # the plain leaf it wraps, {"weight": W [out, in]}
    scale: jax.Array  # [out]

    @classmethod
    def from_base(cls, base: dict[str, jax.Array], *, scale: np.ndarray | None = None) -> OutputScale:
        """Wrap ``base`` with the scale ``scale`` (numpy [out]; default ones: the base's own function), in
        the base weight's dtype."""
        weight = _plain_leaf(base, cls.__name__)["weight"]
        init = output_scale_init(scale, weight.shape[0])
        return cls(base=base, scale=jnp.asarray(init, dtype=weight.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return (x @ self.base["weight"].T) * self.scale

    def fuse(self) -> jax.Array:
        return self.scale[:, None] * self.base["weight"]

    @property
    def in_features(self) -> int:
        return self.base["weight"].shape[1]

    @property
    def out_features(self) -> int:
        return self.base["weight"].shape[0]


def _dense(base: Any) -> jax.Array:
    """The dense weight a base computes with: a plain leaf's own, a wrapper's fused one (a quantized base)."""
    return base.fuse() if isinstance(base, Wrapper) else _plain_leaf(base, "LoRA")["weight"]


def _apply(base: Any, x: jax.Array) -> jax.Array:
    return base(x) if isinstance(base, Wrapper) else x @ base["weight"].T


def _features(base: Any) -> tuple[int, int]:
    if isinstance(base, Wrapper):
        return base.in_features, base.out_features
    out_features, in_features = _plain_leaf(base, "LoRA")["weight"].shape
    return in_features, out_features


@wrapper
class LoRA(Wrapper):
    """LoRA on a frozen linear: ``y = base(x) + scale * (x @ A.T) @ B.T`` with A [rank, in] and B [out, rank];
    fuses into ``W + scale * B @ A`` (gemmalab.lora.lora_merge). Its arrays: ``lora_A``, ``lora_B`` and the
    wrapped ``base.weight``. Dropout is not applied on JAX (the trainer refuses a rate above 0: its jitted step
    takes no random key yet)."""

    base: Any  # the plain leaf {"weight": W [out, in]}, or a quantized wrapper
    lora_A: jax.Array  # [rank, in]  # noqa: N815
    lora_B: jax.Array  # [out, rank]  # noqa: N815
    scale: float = static_field()
    dropout: float = static_field(default=0.0)

    @classmethod
    def from_base(cls, base: Any, *, lora_A: np.ndarray, lora_B: np.ndarray, scale: float,  # noqa: N803
                  dropout: float = 0.0) -> LoRA:
        """Wrap ``base`` with the adapter A, B (numpy, gemmalab.lora's orientation), in the base's dtype."""
        dtype = _dense(base).dtype
        a, b = check_lora_arrays(lora_A, lora_B, *_features(base))
        return cls(base=base, lora_A=jnp.asarray(a, dtype), lora_B=jnp.asarray(b, dtype), scale=float(scale),
                   dropout=float(dropout))

    def update(self, x: jax.Array) -> jax.Array:
        """``scale * (x @ A.T) @ B.T``: what the adapter adds to the base's output on x."""
        return ((x @ self.lora_A.T) @ self.lora_B.T) * self.scale

    def __call__(self, x: jax.Array) -> jax.Array:
        return _apply(self.base, x) + self.update(x)

    def fuse(self) -> jax.Array:
        return _dense(self.base) + self.scale * (self.lora_B @ self.lora_A)

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]


@wrapper
class DoRA(Wrapper):
    """DoRA: LoRA whose adapted weight's output rows are rescaled to a learned magnitude m [out],
    ``y = (m / ||W + scale B A||) * (x @ W.T + scale (x @ A.T) @ B.T)``, the norm held constant in the gradient
    (PEFT; the paper's section 4.3); fuses into gemmalab.lora.dora_merge."""

    base: Any
    lora_A: jax.Array  # noqa: N815
    lora_B: jax.Array  # noqa: N815
    magnitude: jax.Array  # [out]
    scale: float = static_field()
    dropout: float = static_field(default=0.0)

    @classmethod
    def from_base(cls, base: Any, *, lora_A: np.ndarray, lora_B: np.ndarray, scale: float,  # noqa: N803
                  magnitude: np.ndarray, dropout: float = 0.0) -> DoRA:
        dtype = _dense(base).dtype
        a, b, m = check_lora_arrays(lora_A, lora_B, *_features(base), magnitude)
        return cls(base=base, lora_A=jnp.asarray(a, dtype), lora_B=jnp.asarray(b, dtype),
                   magnitude=jnp.asarray(m, dtype), scale=float(scale), dropout=float(dropout))

    def _adapted(self) -> jax.Array:
        return _dense(self.base) + self.scale * (self.lora_B @ self.lora_A)

    def __call__(self, x: jax.Array) -> jax.Array:
        factor = self.magnitude / jax.lax.stop_gradient(jnp.linalg.norm(self._adapted(), axis=1))
        return factor * (_apply(self.base, x) + ((x @ self.lora_A.T) @ self.lora_B.T) * self.scale)

    def fuse(self) -> jax.Array:
        adapted = self._adapted()
        return (self.magnitude / jnp.linalg.norm(adapted, axis=1))[:, None] * adapted

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]


# the quantized linear lives in quantized.py (with its kernels); here it joins the dispatch by name
WRAPPERS: dict[str, type[Wrapper]] = {"output_scale": OutputScale, "lora": LoRA, "dora": DoRA, **QUANTIZED}

__all__ = ["WRAPPERS", "DoRA", "LoRA", "OutputScale"]
