"""Wrappers of linear layers (linears.Wrapper), applied by the walker in linears.py.

``WRAPPERS`` maps the core's wrapper names (gemmalab.linears.WRAPPER_KINDS) to the classes; each class's
merge rule is written in numpy in gemmalab/linears.py, the specification ``fuse`` follows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmalab.errors import InputError
from gemmalab.linears import output_scale_init
from gemmalab.lora import check_lora_arrays

from .linears import Wrapper
from .quantized import QUANTIZED


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


def _dense(base: nn.Module) -> Tensor:
    """The dense weight a base computes with: a plain linear's own, a wrapper's fused one (a quantized base)."""
    return base.fuse() if isinstance(base, Wrapper) else base.weight


def _lora_base(base: nn.Module) -> nn.Module:
    return base if isinstance(base, Wrapper) else _plain_linear(base, "LoRA")


class LoRA(Wrapper):
    """LoRA on a frozen linear: ``y = base(x) + scale * (dropout(x) @ A.T) @ B.T`` with A [rank, in] and B
    [out, rank]; fuses into ``W + scale * B @ A`` (gemmalab.lora.lora_merge). Its parameters: ``lora_A``,
    ``lora_B`` and the wrapped ``base.weight``. Dropout acts in training mode only (``module.train()``)."""

    def __init__(self, base: nn.Module, a: Tensor, b: Tensor, scale: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        trainable = _dense(base).requires_grad
        self.lora_A = nn.Parameter(a, requires_grad=trainable)
        self.lora_B = nn.Parameter(b, requires_grad=trainable)
        self.scale, self.dropout = float(scale), float(dropout)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.train(base.training)  # the model's mode (a new module starts in training mode): dropout in steps only

    @classmethod
    def from_base(cls, base: nn.Module, *, lora_A: np.ndarray, lora_B: np.ndarray, scale: float,  # noqa: N803
                  dropout: float = 0.0) -> LoRA:
        """Wrap ``base`` (a plain linear, or a quantized one) with the adapter A, B (numpy, gemmalab.lora's
        orientation), in the base weight's dtype and device."""
        weight = _dense(_lora_base(base))
        a, b = check_lora_arrays(lora_A, lora_B, base.in_features, base.out_features)
        put = {"device": weight.device, "dtype": weight.dtype}
        return cls(base, torch.from_numpy(a).to(**put), torch.from_numpy(b).to(**put), scale, dropout)

    def adapter_input(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x

    def update(self, x: Tensor) -> Tensor:
        """``scale * (x @ A.T) @ B.T``: what the adapter adds to the base's output on x."""
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.update(self.adapter_input(x))

    def fuse(self) -> Tensor:
        return _dense(self.base) + self.scale * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scale={self.scale:g}, dropout={self.dropout:g}"


class DoRA(LoRA):
    """DoRA: LoRA whose adapted weight's output rows are rescaled to a learned magnitude m [out],
    ``y = (m / ||W + scale B A||) * (x @ W.T + scale (x @ A.T) @ B.T)``, the norm held constant in the gradient
    (PEFT; the paper's section 4.3); fuses into gemmalab.lora.dora_merge. With dropout, as PEFT computes it:
    ``base(x) + (f - 1) * base(dropout(x)) + f * scale * lora(dropout(x))`` with f = m / ||W + scale B A||."""

    def __init__(self, base: nn.Module, a: Tensor, b: Tensor, scale: float, dropout: float, magnitude: Tensor) -> None:
        super().__init__(base, a, b, scale, dropout)
        self.magnitude = nn.Parameter(magnitude, requires_grad=self.lora_A.requires_grad)

    @classmethod
    def from_base(cls, base: nn.Module, *, lora_A: np.ndarray, lora_B: np.ndarray, scale: float,  # noqa: N803
                  magnitude: np.ndarray, dropout: float = 0.0) -> DoRA:
        weight = _dense(_lora_base(base))
        a, b, m = check_lora_arrays(lora_A, lora_B, base.in_features, base.out_features, magnitude)
        put = {"device": weight.device, "dtype": weight.dtype}
        return cls(base, torch.from_numpy(a).to(**put), torch.from_numpy(b).to(**put), scale, dropout,
                   torch.from_numpy(m).to(**put))

    def factor(self) -> Tensor:
        """m / ||W + scale B A|| per output row, the norm detached."""
        adapted = _dense(self.base) + self.scale * (self.lora_B @ self.lora_A)
        return self.magnitude / torch.linalg.vector_norm(adapted, dim=1).detach()

    def forward(self, x: Tensor) -> Tensor:
        factor, dropped = self.factor(), self.adapter_input(x)
        out = self.base(x)
        base_dropped = out if dropped is x else self.base(dropped)
        return out + (factor - 1) * base_dropped + factor * self.update(dropped)

    def fuse(self) -> Tensor:
        adapted = _dense(self.base) + self.scale * (self.lora_B @ self.lora_A)
        return (self.magnitude / torch.linalg.vector_norm(adapted, dim=1))[:, None] * adapted


# the quantized linear lives in quantized.py (with its kernels); here it joins the dispatch by name
WRAPPERS: dict[str, type[Wrapper]] = {"output_scale": OutputScale, "lora": LoRA, "dora": DoRA, **QUANTIZED}

__all__ = ["WRAPPERS", "DoRA", "LoRA", "OutputScale"]
