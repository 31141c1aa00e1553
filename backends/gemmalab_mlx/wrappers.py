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
from gemmalab.lora import check_lora_arrays

from .linears import Wrapper
from .quantized import QUANTIZED


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


def _dense(base: nn.Module) -> mx.array:
    """The dense weight a base computes with: a plain linear's own, a wrapper's fused one (a quantized base)."""
    return base.fuse() if isinstance(base, Wrapper) else base.weight


def _features(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, Wrapper):
        return base.in_features, base.out_features
    out_features, in_features = _plain_linear(base, "LoRA").weight.shape
    return in_features, out_features


class LoRA(Wrapper):
    """LoRA on a frozen linear: ``y = base(x) + scale * (dropout(x) @ A.T) @ B.T`` with A [rank, in] and B
    [out, rank]; fuses into ``W + scale * B @ A`` (gemmalab.lora.lora_merge). Its parameters: ``lora_A``,
    ``lora_B`` and the wrapped ``base.weight``. Dropout acts in training mode only (the trainer's step)."""

    def __init__(self, base: nn.Module, a: mx.array, b: mx.array, scale: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_A, self.lora_B = a, b  # [rank, in], [out, rank]
        self.scale, self.dropout = float(scale), float(dropout)
        self.train(base.training)  # the model's mode (a new module starts in training mode): dropout in steps only

    @classmethod
    def from_base(cls, base: nn.Module, *, lora_A: np.ndarray, lora_B: np.ndarray, scale: float,  # noqa: N803
                  dropout: float = 0.0) -> LoRA:
        """Wrap ``base`` (a plain linear, or a quantized one) with the adapter A, B (numpy, gemmalab.lora's
        orientation), in the base weight's dtype."""
        dtype = _dense(base).dtype
        a, b = check_lora_arrays(lora_A, lora_B, *_features(base))
        return cls(base, mx.array(a).astype(dtype), mx.array(b).astype(dtype), scale, dropout)

    def adapter_input(self, x: mx.array) -> mx.array:
        if not (self.dropout and self.training):
            return x
        keep = mx.random.bernoulli(1.0 - self.dropout, x.shape)
        return mx.where(keep, x / (1.0 - self.dropout), mx.zeros_like(x))

    def update(self, x: mx.array) -> mx.array:
        """``scale * (x @ A.T) @ B.T``: what the adapter adds to the base's output on x."""
        return ((x @ self.lora_A.T) @ self.lora_B.T) * self.scale

    def __call__(self, x: mx.array) -> mx.array:
        return self.base(x) + self.update(self.adapter_input(x))

    def fuse(self) -> mx.array:
        return _dense(self.base) + self.scale * (self.lora_B @ self.lora_A)

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]


class DoRA(LoRA):
    """DoRA: LoRA whose adapted weight's output rows are rescaled to a learned magnitude m [out],
    ``y = (m / ||W + scale B A||) * (x @ W.T + scale (x @ A.T) @ B.T)``, the norm held constant in the gradient
    (PEFT; the paper's section 4.3); fuses into gemmalab.lora.dora_merge. With dropout, as PEFT computes it:
    ``base(x) + (f - 1) * base(dropout(x)) + f * scale * lora(dropout(x))`` with f = m / ||W + scale B A||."""

    def __init__(self, base: nn.Module, a: mx.array, b: mx.array, scale: float, dropout: float, magnitude: mx.array):
        super().__init__(base, a, b, scale, dropout)
        self.magnitude = magnitude  # [out]

    @classmethod
    def from_base(cls, base: nn.Module, *, lora_A: np.ndarray, lora_B: np.ndarray, scale: float,  # noqa: N803
                  magnitude: np.ndarray, dropout: float = 0.0) -> DoRA:
        dtype = _dense(base).dtype
        a, b, m = check_lora_arrays(lora_A, lora_B, *_features(base), magnitude)
        return cls(base, *(mx.array(v).astype(dtype) for v in (a, b)), scale, dropout, mx.array(m).astype(dtype))

    def _adapted(self) -> mx.array:
        return _dense(self.base) + self.scale * (self.lora_B @ self.lora_A)

    def factor(self) -> mx.array:
        """m / ||W + scale B A|| per output row, the norm held constant in the gradient."""
        return self.magnitude / mx.stop_gradient(mx.linalg.norm(self._adapted(), axis=1))

    def __call__(self, x: mx.array) -> mx.array:
        factor, dropped = self.factor(), self.adapter_input(x)
        out = self.base(x)
        base_dropped = out if dropped is x else self.base(dropped)
        return out + (factor - 1) * base_dropped + factor * self.update(dropped)

    def fuse(self) -> mx.array:
        adapted = self._adapted()
        return (self.magnitude / mx.linalg.norm(adapted, axis=1))[:, None] * adapted


# the quantized linear lives in quantized.py (with its kernels); here it joins the dispatch by name
WRAPPERS: dict[str, type[Wrapper]] = {"output_scale": OutputScale, "lora": LoRA, "dora": DoRA, **QUANTIZED}

__all__ = ["WRAPPERS", "DoRA", "LoRA", "OutputScale"]
