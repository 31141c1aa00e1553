"""Wrappers of linear layers (linears.Wrapper), applied by the walker in linears.py.

``WRAPPERS`` maps the core's wrapper names (gemmalab.linears.WRAPPER_KINDS) to the classes; each class's
merge rule is written in numpy in gemmalab/linears.py, the specification ``fuse`` follows.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from gemmalab.errors import InputError
from gemmalab.linears import output_scale_init

from .linears import Wrapper


def _plain_linear(base: nn.Module, wrapper: str) -> nn.Linear:
    if not isinstance(base, nn.Linear) or base.bias is not None:
        raise InputError(f"{wrapper} wraps a plain linear (nn.Linear without bias), got {type(base).__name__}")
    return base


class OutputScale(Wrapper):
    """A learned per-output-feature scale s [out] on a linear: ``y = s * (x @ W.T)``; fuses into the dense
    weight ``s[:, None] * W`` (gemmalab.linears.output_scale). Its parameters: ``scale`` and the wrapped
    ``base.weight``."""

    def __init__(self, base: nn.Linear, scale: Tensor) -> None:
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(scale, requires_grad=base.weight.requires_grad)
        self.in_features, self.out_features = base.in_features, base.out_features

    @classmethod
    def from_base(cls, base: nn.Linear, *, scale: np.ndarray | None = None) -> OutputScale:
        """Wrap ``base`` with the scale ``scale`` (numpy [out]; default ones: the base's own function),
        in the base weight's dtype and device."""
        base = _plain_linear(base, cls.__name__)
        weight = base.weight
        init = output_scale_init(scale, base.out_features)
        return cls(base, torch.from_numpy(init).to(device=weight.device, dtype=weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) * self.scale

    def fuse(self) -> Tensor:
        return self.scale[:, None] * self.base.weight

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}"


WRAPPERS: dict[str, type[Wrapper]] = {"output_scale": OutputScale}

__all__ = ["WRAPPERS", "OutputScale"]
