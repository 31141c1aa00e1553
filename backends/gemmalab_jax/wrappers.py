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

from .linears import Wrapper, wrapper


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


WRAPPERS: dict[str, type[Wrapper]] = {"output_scale": OutputScale}

__all__ = ["WRAPPERS", "OutputScale"]
