"""The trainer's loss as a spec: terms on the student's logits, evaluated chunk by chunk over positions, and
auxiliary terms on tensors captured inside the model. The numpy functions here are the definition every
backend computes (and the tests' oracle); a backend maps each term class to its own tensor code.

Every term is a *sum* over positions of ``position weight * per-position loss`` (the core divides the
accumulated sum by the number of trained tokens, so micro-batches add up exactly), times the term's own
``weight``.

Head terms (``LossSpec.head``) see one chunk of positions at a time: the student's float32 logits
[chunk, vocab] (after the soft-cap, when the model has one), the chunk's targets and position weights, and
the chunk's rows of any per-position extra input the term names (``Batch.extras[name]``, [batch, seq, ...]).
So ``[batch, seq, vocab]`` logits never exist, whichever terms are chosen:

* ``CrossEntropy``: ``(1 - eps) * -log p(target) + eps * mean_v -log p(v)`` (label smoothing eps);
* ``SoftTargetCrossEntropy``: cross-entropy against given probabilities q [batch, seq, vocab] at temperature
  T: ``T^2 * -sum_v q_v log softmax(z / T)_v``. The T^2 keeps the gradient's scale independent of T (Hinton
  et al. 2015, "Distilling the knowledge in a neural network", section 2).

Auxiliary terms (``LossSpec.aux``) read a captured tensor, with gradients flowing back through it:

* ``HiddenStateMSE``: hidden state ``layer`` (transformers' index: 0 = the scaled embeddings, i = the output
  of block i - 1, the last = after the final norm) against a target [batch, seq, hidden]:
  ``mean over features of (h - target)^2`` per position;
* ``AttentionKL``: the attention probabilities of ``layer`` [batch, heads, seq, seq] against target
  probabilities of the same shape: ``mean over heads of KL(target || p)`` per query position (MiniLM's
  attention transfer, Wang et al. 2020), with ``0 * log 0 = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

# Probabilities below this are read as this inside a logarithm: log(0) would make 0 * log(0) a NaN (and its
# gradient too), where the limit is 0. It is far below any probability float32 resolves next to 1.
LOG_FLOOR = 1e-30


def _check_weight(weight: float, what: str) -> None:
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise InputError(f"the weight of {what} must be a finite number >= 0, got {weight!r}")


def _check_layer(layer: int, what: str) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise InputError(f"{what} needs a layer index >= 0, got {layer!r}")


# --- the terms ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CrossEntropy:
    """Next-token cross-entropy against the batch's targets, with label smoothing."""

    label_smoothing: float = 0.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InputError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check_weight(self.weight, "the cross-entropy")

    @property
    def extras(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class SoftTargetCrossEntropy:
    """Cross-entropy against dense target probabilities ``Batch.extras[targets]`` [batch, seq, vocab]."""

    targets: str = "soft_targets"
    temperature: float = 1.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"the temperature must be a finite number > 0, got {self.temperature}")
        _check_weight(self.weight, "the soft-target cross-entropy")

    @property
    def extras(self) -> tuple[str, ...]:
        return (self.targets,)


@dataclass(frozen=True)
class HiddenStateMSE:
    """Mean squared error of hidden state ``layer`` against ``Batch.extras[targets]`` [batch, seq, hidden]."""

    layer: int
    targets: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check_layer(self.layer, "a hidden-state loss")
        _check_weight(self.weight, "a hidden-state loss")

    @property
    def extras(self) -> tuple[str, ...]:
        return (self.targets,)


@dataclass(frozen=True)
class AttentionKL:
    """KL(target || attention probabilities of ``layer``), target ``Batch.extras[targets]`` [batch, heads,
    seq, seq]."""

    layer: int
    targets: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check_layer(self.layer, "an attention loss")
        _check_weight(self.weight, "an attention loss")

    @property
    def extras(self) -> tuple[str, ...]:
        return (self.targets,)


HeadTerm = CrossEntropy | SoftTargetCrossEntropy
AuxTerm = HiddenStateMSE | AttentionKL


@dataclass(frozen=True)
class LossSpec:
    """The terms of the trainer's loss: ``head`` on the logits (chunked), ``aux`` on captured tensors."""

    head: tuple[HeadTerm, ...] = (CrossEntropy(),)
    aux: tuple[AuxTerm, ...] = field(default=())

    def __post_init__(self) -> None:
        # Lists are accepted for convenience; stored as tuples so the spec stays hashable (jit-static).
        object.__setattr__(self, "head", tuple(self.head))
        object.__setattr__(self, "aux", tuple(self.aux))
        if not self.head:
            raise InputError("a loss needs at least one term on the logits (e.g. CrossEntropy())")
        for term in self.head:
            if not isinstance(term, (CrossEntropy, SoftTargetCrossEntropy)):
                raise InputError(f"{type(term).__name__} is not a loss on the logits: put it in aux=")
        for term in self.aux:
            if not isinstance(term, (HiddenStateMSE, AttentionKL)):
                raise InputError(f"{type(term).__name__} is not an auxiliary loss: put it in head=")

    @property
    def extras(self) -> tuple[str, ...]:
        """Names of the per-batch extra inputs the terms read, each once, in order."""
        return tuple(dict.fromkeys(name for term in self.head + self.aux for name in term.extras))

    @property
    def head_extras(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for term in self.head for name in term.extras))

    def hidden_layers(self) -> tuple[int, ...]:
        """Hidden-state indices the aux terms read (the trainer captures these), sorted."""
        return tuple(sorted({t.layer for t in self.aux if isinstance(t, HiddenStateMSE)}))

    def attention_layers(self) -> tuple[int, ...]:
        """Layers whose attention probabilities the aux terms read (only these leave the fused kernel)."""
        return tuple(sorted({t.layer for t in self.aux if isinstance(t, AttentionKL)}))

    @property
    def plain_cross_entropy(self) -> bool:
        """One cross-entropy term and nothing else: the case backends give a hand-written fused gradient."""
        return len(self.head) == 1 and isinstance(self.head[0], CrossEntropy) and not self.aux


# --- numpy definitions --------------------------------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def cross_entropy(logits: np.ndarray, targets: np.ndarray, label_smoothing: float = 0.0) -> np.ndarray:
    """Per-position cross-entropy [...] of logits [..., vocab] against int targets [...]."""
    log_p = log_softmax(logits)
    nll = -np.take_along_axis(log_p, np.asarray(targets)[..., None], axis=-1)[..., 0]
    return (1 - label_smoothing) * nll + label_smoothing * -log_p.mean(axis=-1)


def soft_target_cross_entropy(logits: np.ndarray, probs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Per-position ``T^2 * -sum_v q_v log softmax(z / T)_v`` [...] of logits and probabilities [..., vocab]."""
    log_p = log_softmax(np.asarray(logits, np.float64) / temperature)
    return temperature**2 * -(np.asarray(probs, np.float64) * log_p).sum(axis=-1)


def hidden_state_mse(hidden: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-position mean over features of (hidden - target)^2 [...], of [..., features] arrays."""
    diff = np.asarray(hidden, np.float64) - np.asarray(target, np.float64)
    return np.mean(diff * diff, axis=-1)


def attention_kl(probs: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per (batch, query) mean over heads of KL(target || probs) [batch, seq], of [batch, heads, seq, keys]."""
    p = np.maximum(np.asarray(probs, np.float64), LOG_FLOOR)
    t = np.asarray(target, np.float64)
    kl = (t * (np.log(np.maximum(t, LOG_FLOOR)) - np.log(p))).sum(axis=-1)  # [batch, heads, seq]
    return kl.mean(axis=1)


def head_term(term: HeadTerm, logits: np.ndarray, targets: np.ndarray, extras: dict[str, np.ndarray]) -> np.ndarray:
    """The per-position loss of one head term (without its weight)."""
    if isinstance(term, CrossEntropy):
        return cross_entropy(logits, targets, term.label_smoothing)
    return soft_target_cross_entropy(logits, extras[term.targets], term.temperature)


def loss_sum(
    spec: LossSpec,
    logits: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    extras: dict[str, np.ndarray] | None = None,
    hidden_states: dict[int, np.ndarray] | None = None,
    attentions: dict[int, np.ndarray] | None = None,
) -> float:
    """The whole loss of ``spec`` from full logits [batch, seq, vocab] and the captured tensors it reads, in
    float64: the definition the chunked backends compute."""
    extras = extras or {}
    w = np.asarray(weights, np.float64)
    total = sum(term.weight * np.sum(w * head_term(term, logits, targets, extras)) for term in spec.head)
    for term in spec.aux:
        if isinstance(term, HiddenStateMSE):
            per_position = hidden_state_mse(hidden_states[term.layer], extras[term.targets])
        else:
            per_position = attention_kl(attentions[term.layer], extras[term.targets])
        total += term.weight * np.sum(w * per_position)
    return float(total)


__all__ = [
    "LOG_FLOOR",
    "AttentionKL",
    "AuxTerm",
    "CrossEntropy",
    "HeadTerm",
    "HiddenStateMSE",
    "LossSpec",
    "SoftTargetCrossEntropy",
    "attention_kl",
    "cross_entropy",
    "head_term",
    "hidden_state_mse",
    "log_softmax",
    "loss_sum",
    "soft_target_cross_entropy",
]
