"""Wrappers of linear layers (linears.Wrapper), applied by the walker in linears.py.

``WRAPPERS`` maps the core's wrapper names (gemmalab.linears.WRAPPER_KINDS) to the classes; each class's
merge rule is written in numpy in gemmalab/linears.py, the specification ``fuse`` follows.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from gemmalab.errors import InputError
from gemmalab.linears import output_scale_init

from .linears import Wrapper


def _plain_linear(base: nn.Module, wrapper: str) -> nn.Linear:
    if not isinstance(base, nn.Linear) or "bias" in base:
        raise InputError(f"{wrapper} wraps a plain linear (nn.Linear without bias), got {type(base).__name__}")
    return base


class OutputScale(Wrapper):
    """A learned per-output-feature scale s [out] on a linear: ``y = s * (x @ W.T)``; fuses into the dense
    weight ``s[:, None] * W`` (gemmalab.linears.output_scale). Its parameters: ``scale`` and the wrapped
    ``base.weight``."""

    def __init__(self, base: nn.Linear, scale: mx.array):
        super().__init__()
        self.base = base
        self.scale = scale  # [out]

    @classmethod
    def from_base(cls, base: nn.Linear, *, scale: np.ndarray | None = None) -> OutputScale:
        """Wrap ``base`` with the scale ``scale`` (numpy [out]; default ones: the base's own function), in
        the base weight's dtype."""
        weight = _plain_linear(base, cls.__name__).weight
        init = output_scale_init(scale, weight.shape[0])
        return cls(base, mx.array(init).astype(weight.dtype))

    def __call__(self, x: mx.array) -> mx.array:
        return self.base(x) * self.scale

    def fuse(self) -> mx.array:
        return self.scale[:, None] * self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.base.weight.shape[0]


WRAPPERS: dict[str, type[Wrapper]] = {"output_scale": OutputScale}

__all__ = ["WRAPPERS", "OutputScale"]
