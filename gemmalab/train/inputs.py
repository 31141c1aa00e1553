"""One micro-batch as a trainer receives it, checked once here for every backend.

A batch is token ids, next-token targets and per-position loss weights, and optionally: explicit
``positions`` ([seq] or [batch, seq]; they drive RoPE and the masks), a boolean ``mask`` ([seq, seq] or
[batch, seq, seq], True = may attend; it replaces the causal rule and local layers keep their window on top,
gemmalab.masks) and ``extras``, the named per-batch inputs the loss terms read (gemmalab.train.losses).
``prepare`` validates all of it against the model's config and the loss spec, builds each layer type's
mask in numpy, and says which tensors the trainer must capture.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .. import masks as mask_rules
from ..checks import check_token_ids
from ..config import Gemma3Config
from ..errors import InputError
from .losses import AttentionKL, HiddenStateMSE, LossSpec, SoftTargetCrossEntropy


@dataclass(frozen=True)
class StepInputs:
    """A checked micro-batch. ``masks`` is None for a plain causal batch (backends keep their fused causal
    path); otherwise one boolean [batch, seq, seq] per layer type, with ``positions`` int64 [batch, seq]."""

    inputs: np.ndarray  # int32 [batch, seq]
    targets: np.ndarray  # int32 [batch, seq]
    weights: np.ndarray  # float32 [batch, seq]
    positions: np.ndarray | None
    masks: dict[str, np.ndarray] | None
    extras: dict[str, np.ndarray]  # float32, as the loss terms name them
    hidden_layers: tuple[int, ...]  # hidden-state indices to capture (transformers' convention)
    attention_layers: tuple[int, ...]  # layers whose attention probabilities to capture


def prepare(
    config: Gemma3Config,
    loss: LossSpec,
    inputs: object,
    targets: object,
    weights: object,
    *,
    positions: object = None,
    mask: object = None,
    extras: Mapping[str, object] | None = None,
) -> StepInputs:
    """The checked micro-batch (see the module docstring); one InputError line for anything wrong."""
    vocab = config.vocab_size
    ids, tgt = check_token_ids(inputs, vocab), check_token_ids(targets, vocab)
    w = np.asarray(weights)
    if ids.shape != tgt.shape or ids.shape != w.shape:
        raise InputError(
            f"inputs, targets and weights must share one [batch, seq] shape, got {ids.shape}, {tgt.shape}, {w.shape}"
        )
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise InputError(f"loss weights must be numbers (float32), got {w.dtype}")
    batch, seq = ids.shape

    at = per_type = None
    if positions is not None or mask is not None:
        at = np.ascontiguousarray(mask_rules.as_positions(positions, batch, seq))
        explicit = None if mask is None else mask_rules.as_mask(mask, batch, seq, seq)
        per_type = mask_rules.layer_masks(config, at, explicit)
        mask_rules.check_every_query_sees_a_key(per_type)
        per_type = {kind: np.ascontiguousarray(m) for kind, m in per_type.items()}

    return StepInputs(
        inputs=ids.astype(np.int32),
        targets=tgt.astype(np.int32),
        weights=w.astype(np.float32),
        positions=at,
        masks=per_type,
        extras=_extras(config, loss, dict(extras or {}), batch, seq),
        hidden_layers=_layers(loss.hidden_layers(), config.num_hidden_layers + 1, "hidden state"),
        attention_layers=_layers(loss.attention_layers(), config.num_hidden_layers, "attention"),
    )


def _layers(layers: tuple[int, ...], count: int, what: str) -> tuple[int, ...]:
    for layer in layers:
        if layer >= count:
            raise InputError(f"a loss reads {what} {layer}, but this model has {count} (indices 0 to {count - 1})")
    return layers


def _extras(config: Gemma3Config, loss: LossSpec, given: dict[str, object], batch: int, seq: int) -> dict[str, np.ndarray]:
    """The extra inputs the loss reads, float32, each of the shape its term needs."""
    needed = loss.extras
    missing = [name for name in needed if name not in given]
    if missing:
        raise InputError(f"the loss reads the extra input {missing[0]!r}, which the batch does not carry: "
                         f"pass extras={{{missing[0]!r}: array}}")
    unread = sorted(set(given) - set(needed))
    if unread:
        raise InputError(f"the batch carries the extra input {unread[0]!r}, which no loss term reads: "
                         "drop it, or add the term that reads it")
    shapes: dict[str, tuple[int, ...]] = {}
    for term in loss.head + loss.aux:
        if isinstance(term, SoftTargetCrossEntropy):
            shapes[term.targets] = (batch, seq, config.vocab_size)
        elif isinstance(term, HiddenStateMSE):
            shapes[term.targets] = (batch, seq, config.hidden_size)
        elif isinstance(term, AttentionKL):
            shapes[term.targets] = (batch, config.num_attention_heads, seq, seq)
    out = {}
    for name in needed:
        array = np.asarray(given[name])
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise InputError(f"extra input {name!r} must be numbers, got {array.dtype}")
        if array.shape != shapes[name]:
            raise InputError(f"extra input {name!r} has shape {list(array.shape)}, not the {list(shapes[name])} "
                             "its loss term reads")
        if not np.all(np.isfinite(array)):
            raise InputError(f"extra input {name!r} holds NaN or infinite values")
        out[name] = np.ascontiguousarray(array, dtype=np.float32)
    return out


__all__ = ["StepInputs", "prepare"]
