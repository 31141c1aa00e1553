"""One micro-batch as a trainer receives it, checked once here for every backend.

A batch is token ids, next-token targets and per-position loss weights, and optionally: explicit
``positions`` ([seq] or [batch, seq]; they drive RoPE and the masks), a boolean ``mask`` ([seq, seq] or
[batch, seq, seq], True = may attend; it replaces the causal rule and local layers keep their window on top,
gemmalab.masks) and ``extras``, the named per-batch inputs the loss terms read (gemmalab.train.losses), and
``scalars``, the named per-step numbers they read (a scheduled distillation temperature).
``prepare`` validates all of it against the model's config and the loss spec, builds each layer type's
mask in numpy (for the student and for each companion model, whose sliding window may differ), and says
which tensors the trainer must capture.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .. import masks as mask_rules
from ..checks import check_token_ids
from ..config import Gemma3Config
from ..errors import InputError
from .losses import (
    AttentionKL,
    AttentionTransfer,
    CachedDistillation,
    Distillation,
    HiddenStateMSE,
    LossSpec,
    SoftTargetCrossEntropy,
)


@dataclass(frozen=True)
class StepInputs:
    """A checked micro-batch. ``masks`` is None for a plain causal batch (backends keep their fused causal
    path); otherwise one boolean [batch, seq, seq] per layer type, with ``positions`` int64 [batch, seq]."""

    inputs: np.ndarray  # int32 [batch, seq]
    targets: np.ndarray  # int32 [batch, seq]
    weights: np.ndarray  # float32 [batch, seq]
    positions: np.ndarray | None
    masks: dict[str, np.ndarray] | None
    extras: dict[str, np.ndarray]  # as the loss terms name them: float32, teacher ids int32
    hidden_layers: tuple[int, ...]  # hidden-state indices to capture (transformers' convention)
    attention_layers: tuple[int, ...]  # layers whose attention probabilities to capture
    query_key_layers: tuple[int, ...] = ()  # layers whose queries and keys the attention transfer reads
    scalars: dict[str, float] = field(default_factory=dict)  # as the loss terms name them
    # companion name -> its masks per layer type (its own sliding window), with ``masks``; else None
    companion_masks: dict[str, dict[str, np.ndarray]] | None = None


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
    scalars: Mapping[str, float] | None = None,
    companions: Mapping[str, Gemma3Config] | None = None,
) -> StepInputs:
    """The checked micro-batch (see the module docstring); one InputError line for anything wrong.
    ``companions`` are the configs of the companion models (by name) that run on the same ids."""
    vocab = config.vocab_size
    ids, tgt = check_token_ids(inputs, vocab), check_token_ids(targets, vocab)
    companions = dict(companions or {})
    _check_companion_ids(ids, companions)
    w = np.asarray(weights)
    if ids.shape != tgt.shape or ids.shape != w.shape:
        raise InputError(
            f"inputs, targets and weights must share one [batch, seq] shape, got {ids.shape}, {tgt.shape}, {w.shape}"
        )
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise InputError(f"loss weights must be numbers (float32), got {w.dtype}")
    batch, seq = ids.shape

    at = per_type = companion_masks = None
    # An attention transfer term reads each row's visible keys, so its batches always carry their masks.
    if positions is not None or mask is not None or loss.query_key_layers():
        at = np.ascontiguousarray(mask_rules.as_positions(positions, batch, seq))
        explicit = None if mask is None else mask_rules.as_mask(mask, batch, seq, seq)
        per_type = _layer_masks(config, at, explicit)
        # A companion with the student's window shares its masks (the same arrays, not copies).
        companion_masks = {name: per_type if other.sliding_window == config.sliding_window
                           else _layer_masks(other, at, explicit) for name, other in companions.items()}
        _check_transfer_rows(loss, config, companions, per_type, companion_masks)

    return StepInputs(
        inputs=ids.astype(np.int32),
        targets=tgt.astype(np.int32),
        weights=w.astype(np.float32),
        positions=at,
        masks=per_type,
        extras=_extras(config, loss, dict(extras or {}), batch, seq),
        hidden_layers=_layers(loss.hidden_layers(), config.num_hidden_layers + 1, "hidden state"),
        attention_layers=_layers(loss.attention_layers(), config.num_hidden_layers, "attention"),
        query_key_layers=_layers(loss.query_key_layers(), config.num_hidden_layers, "the queries and keys of block"),
        scalars=_scalars(loss, dict(scalars or {})),
        companion_masks=companion_masks,
    )


def _layer_masks(config: Gemma3Config, positions: np.ndarray, explicit: np.ndarray | None) -> dict[str, np.ndarray]:
    per_type = mask_rules.layer_masks(config, positions, explicit)
    mask_rules.check_every_query_sees_a_key(per_type)
    return {kind: np.ascontiguousarray(m) for kind, m in per_type.items()}


def _check_transfer_rows(loss: LossSpec, config: Gemma3Config, companions: Mapping[str, Gemma3Config],
                         per_type: dict[str, np.ndarray], companion_masks: dict[str, dict[str, np.ndarray]]) -> None:
    """An attention transfer compares the teacher's row over the keys both layers may see: refuse a mask under
    which some query of a mapped pair sees no key in common (its teacher row would be 0/0)."""
    for term in loss.transfer:
        if not isinstance(term, AttentionTransfer) or term.teacher not in companions:
            continue
        student = per_type[config.layer_types[term.student_layer]]
        teacher = companion_masks[term.teacher][companions[term.teacher].layer_types[term.teacher_layer]]
        empty = np.argwhere(~(student & teacher).any(axis=-1))
        if len(empty):
            row, query = empty[0]
            raise InputError(f"under this mask query {query} of row {row} sees no key that both student block "
                             f"{term.student_layer} and teacher block {term.teacher_layer} may see: allow each query "
                             "its own position")


def _check_companion_ids(ids: np.ndarray, companions: Mapping[str, Gemma3Config]) -> None:
    """A companion embeds the student's input ids too: each must be one of its ids (a teacher with a smaller
    vocabulary than the student's cannot read the student's last ids; JAX would read a fill value silently)."""
    high = int(ids.max())
    for name, other in companions.items():
        if high >= other.vocab_size:
            raise InputError(f"input id {high} is outside the vocabulary of the companion model {name!r} "
                             f"({other.vocab_size} ids): feed ids below {other.vocab_size}, or distil from a teacher "
                             "whose vocabulary covers the student's")


def _check_names(needed: tuple[str, ...], given: Mapping[str, object], *, missing: str, unread: str) -> None:
    """One InputError line for the first name the loss reads that is not given, else for the first given name
    it does not read (``missing`` / ``unread`` are format strings of ``name``)."""
    absent = [name for name in needed if name not in given]
    if absent:
        raise InputError(missing.format(name=absent[0]))
    extra = sorted(set(given) - set(needed))
    if extra:
        raise InputError(unread.format(name=extra[0]))


def _scalars(loss: LossSpec, given: dict[str, float]) -> dict[str, float]:
    """The step's scalars the loss reads, as floats: each present, read by a term, finite, and > 0 where a
    term reads it as a temperature."""
    needed = loss.scalars
    _check_names(needed, given,
                 missing="the loss reads the scalar {name!r}, which this step does not pass: pass scalars={{{name!r}: value}}",
                 unread="the step passes the scalar {name!r}, which no loss term reads: drop it, or name it in a term "
                        "(e.g. Distillation(temperature_input=...))")
    temperatures = {t.temperature_input for t in loss.head if isinstance(t, Distillation)}
    out = {}
    for name in needed:
        value = given[name]
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) \
                or not np.isfinite(value):
            raise InputError(f"the scalar {name!r} must be a finite number, got {value!r}")
        if name in temperatures and value <= 0:
            raise InputError(f"the scalar {name!r} is a temperature and must be > 0, got {value!r}")
        out[name] = float(value)
    return out


def _layers(layers: tuple[int, ...], count: int, what: str) -> tuple[int, ...]:
    for layer in layers:
        if layer >= count:
            raise InputError(f"a loss reads {what} {layer}, but this model has {count} (indices 0 to {count - 1})")
    return layers


def _extras(config: Gemma3Config, loss: LossSpec, given: dict[str, object], batch: int, seq: int) -> dict[str, np.ndarray]:
    """The extra inputs the loss reads, each of the shape its term needs: float32, except a cached
    distillation term's teacher ids, int32 (checked by ``_cached_targets``)."""
    needed = loss.extras
    _check_names(needed, given,
                 missing="the loss reads the extra input {name!r}, which the batch does not carry: pass extras={{{name!r}: array}}",
                 unread="the batch carries the extra input {name!r}, which no loss term reads: drop it, or add the "
                        "term that reads it")
    shapes: dict[str, tuple[int, ...]] = {}
    cached = [term for term in loss.head if isinstance(term, CachedDistillation)]
    for term in loss.head + loss.aux:
        if isinstance(term, SoftTargetCrossEntropy):
            shapes[term.targets] = (batch, seq, config.vocab_size)
        elif isinstance(term, HiddenStateMSE):
            shapes[term.targets] = (batch, seq, config.hidden_size)
        elif isinstance(term, AttentionKL):
            shapes[term.targets] = (batch, config.num_attention_heads, seq, seq)
    out = _cached_targets(config, cached, given, batch, seq)
    clash = sorted(set(out) & set(shapes))
    if clash:
        raise InputError(f"the extra input {clash[0]!r} is read as cached teacher targets and by another term: "
                         "give each term its own names")
    for name in needed:
        if name in out:
            continue
        array = _numbers(name, given[name])
        if array.shape != shapes[name]:
            raise InputError(f"extra input {name!r} has shape {list(array.shape)}, not the {list(shapes[name])} "
                             "its loss term reads")
        out[name] = np.ascontiguousarray(array, dtype=np.float32)
    return out


def _numbers(name: str, value: object) -> np.ndarray:
    """``value`` as a numpy array of finite numbers."""
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"extra input {name!r} must be numbers, got {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"extra input {name!r} holds NaN or infinite values")
    return array


# A tail mass this far outside [0, 1] is float32 rounding of 1 - sum p (it is clipped into [0, 1]); further out
# it is not a probability.
TAIL_TOLERANCE = 1e-6


def _cached_targets(config: Gemma3Config, terms: list[CachedDistillation], given: dict[str, object], batch: int,
                    seq: int) -> dict[str, np.ndarray]:
    """The cached distillation terms' extras: ids int32 [batch, seq, k], each an id of the student's vocabulary
    (distinct within a position for top-k targets); log-probabilities float32 [batch, seq, k] (finite, <= 0),
    with the k of their ids; tails float32 [batch, seq], in [0, 1] (clipped there within TAIL_TOLERANCE)."""
    out: dict[str, np.ndarray] = {}
    vocab = config.vocab_size
    roles: dict[str, str] = {}
    for term in terms:
        for name, role in zip(term.extras, ("ids", "log-probabilities", "tail mass"), strict=False):
            if roles.setdefault(name, role) != role:
                raise InputError(f"the extra input {name!r} is read as teacher {roles[name]} and as teacher {role}: "
                                 "give each its own name")
    for term in terms:
        ids = np.asarray(given[term.ids])
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"extra input {term.ids!r} (teacher ids) must be integers, got {ids.dtype}")
        if ids.ndim != 3 or ids.shape[:2] != (batch, seq) or ids.shape[2] < 1:
            raise InputError(f"extra input {term.ids!r} (teacher ids) has shape {list(ids.shape)}, not "
                             f"[{batch}, {seq}, k] (k ids per position)")
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise InputError(f"extra input {term.ids!r} holds the id {bad}, outside the student's vocabulary of {vocab} "
                             "ids: cache the teacher's targets over the student's vocabulary")
        if term.estimator == "top-k" and ids.shape[2] > 1:
            ordered = np.sort(ids, axis=-1)
            if np.any(ordered[..., 1:] == ordered[..., :-1]):
                raise InputError(f"extra input {term.ids!r} repeats an id within a position: top-k ids are distinct "
                                 "(sampled ids may repeat: estimator='sampled')")
        logprobs = _numbers(term.logprobs, given[term.logprobs])
        if logprobs.shape != ids.shape:
            raise InputError(f"extra input {term.logprobs!r} (teacher log-probabilities) has shape "
                             f"{list(logprobs.shape)}, not the {list(ids.shape)} of its ids {term.ids!r}")
        if np.any(logprobs > 0):
            raise InputError(f"extra input {term.logprobs!r} holds values above 0 (up to {float(logprobs.max()):g}): "
                             "log-probabilities are <= 0")
        out[term.ids] = np.ascontiguousarray(ids, dtype=np.int32)
        out[term.logprobs] = np.ascontiguousarray(logprobs, dtype=np.float32)
        if term.estimator == "top-k":
            tail = np.asarray(given[term.tail])
            if np.issubdtype(tail.dtype, np.floating) and np.isnan(tail).any():
                raise InputError(f"extra input {term.tail!r} (teacher tail mass) holds NaN: sampled targets have no "
                                 "tail, so train them with estimator='sampled'")
            tail = _numbers(term.tail, tail)
            if tail.shape != (batch, seq):
                raise InputError(f"extra input {term.tail!r} (teacher tail mass) has shape {list(tail.shape)}, "
                                 f"not [{batch}, {seq}]")
            if tail.min() < -TAIL_TOLERANCE or tail.max() > 1 + TAIL_TOLERANCE:
                bad = float(tail.min()) if tail.min() < -TAIL_TOLERANCE else float(tail.max())
                raise InputError(f"extra input {term.tail!r} holds the tail mass {bad:g}, outside [0, 1]")
            out[term.tail] = np.ascontiguousarray(np.clip(tail, 0.0, 1.0), dtype=np.float32)
    return out


__all__ = ["StepInputs", "prepare"]
