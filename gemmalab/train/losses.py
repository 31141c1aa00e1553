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
* ``Distillation``: a divergence between the student's distribution and a frozen *companion* model's (the
  teacher, ``Distillation.teacher`` names it), whose own output head runs in the same chunk loop on its own
  final hidden states, so its [batch, seq, vocab] logits never exist either. Both logits are first restricted
  to the shared vocabulary (``shared_vocab``: the first min(V_student, V_teacher) ids), then, with
  ``p_s = softmax(z_s / T)`` and ``p_t = softmax(z_t / T)`` over those ids:

  - ``fkl``: forward KL, ``KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)`` (mode-covering; Hinton's KD);
  - ``rkl``: reverse KL, ``KL(p_s || p_t)`` (mode-seeking; MiniLLM, Gu et al. 2024);
  - ``jsd``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1) as TRL computes it
    (``GKDTrainer.generalized_jsd_loss``): with ``m = (1 - beta) p_s + beta p_t``,
    ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``; by TRL's convention beta = 0 is *defined* as forward KL
    and beta = 1 as reverse KL (the mixture formula itself tends to 0 at both ends);
  - ``tvd``: total variation, ``0.5 * sum_v |p_t - p_s|``;

  each times ``T^2`` when ``t2_scaling`` (as for the soft targets above; TRL has no such factor). T is the
  term's ``temperature``, or the per-step scalar ``temperature_input`` names (a temperature schedule,
  gemmalab.train.schedules.ValueSchedule). ``distillation_loss`` builds the usual mixture
  ``alpha * CE + (1 - alpha) * KD``.
* ``CachedDistillation``: distillation from sparse teacher targets an offline cache keeps per position
  (gemmalab.distill.cache; gemmalab.distill.sparse defines them and these estimators), so no teacher runs.
  Three per-position extras: the teacher's k ids (int32 [batch, seq, k]), their log-probabilities log p
  (float32 [batch, seq, k]) and, for top-k targets, the tail mass r = 1 - sum of the kept p (float32
  [batch, seq]). With ``q = softmax(z / T)`` over the student's whole vocabulary (z soft-capped):

  - ``top-k`` (the k most probable ids S): the KL over k + 1 buckets, the kept ids and one rest bucket,
    ``sum_{i in S} p_i (log p_i - log q_i) + r (log r - log q_rest)`` with ``q_rest = 1 - sum_{i in S} q_i``
    and ``0 log 0 = 0`` (``sparse.sparse_kl``); with k = vocabulary it is ``Distillation``'s ``fkl``;
  - ``sampled`` (k ids drawn with replacement from p): ``-(1/k) sum_m log q_{j_m}``
    (``sparse.sampled_cross_entropy``), an unbiased estimate of H(p, q) = KL(p || q) + H(p), whose gradient
    is an unbiased estimate of the forward KL's;

  each times ``T^2`` when ``t2_scaling``. T scales the student only: the cached log p were computed at the
  cache's temperature. ``cached_distillation_loss`` builds ``alpha * CE + (1 - alpha) * cached KD``.

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
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

# Probabilities below this are read as this inside a logarithm: log(0) would make 0 * log(0) a NaN (and its
# gradient too), where the limit is 0. It is far below any probability float32 resolves next to 1.
LOG_FLOOR = 1e-30


def _check_weight(weight: float, what: str) -> None:
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise InputError(f"the weight of {what} must be a finite number >= 0, got {weight!r}")


def _is_number(value: object) -> bool:
    """A real number (numpy's too), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_temperature(temperature: float) -> None:
    if not (_is_number(temperature) and math.isfinite(temperature) and temperature > 0):
        raise InputError(f"the temperature must be a finite number > 0, got {temperature!r}")


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
        _check_temperature(self.temperature)
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


HIDDEN_METRICS = ("cosine", "mse")


@dataclass(frozen=True)
class HiddenStateTransfer:
    """The student's hidden state ``student_layer`` against the companion ``teacher``'s hidden state
    ``teacher_layer`` (both in transformers' index: 0 = the scaled embeddings, i = the output of block i - 1,
    the last = after the final norm), per position: ``1 - cos(P h_s, h_t)`` (``cosine``) or
    ``mean over features of (P h_s - h_t)^2`` (``mse``), where P is the trainable loss parameter
    ``projection`` [teacher hidden, student hidden] (gemmalab.train.transfer), or the identity when None
    (the widths must then agree)."""

    student_layer: int
    teacher_layer: int
    metric: str = "cosine"
    projection: str | None = None
    teacher: str = "teacher"
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check_layer(self.student_layer, "a hidden-state transfer (student side)")
        _check_layer(self.teacher_layer, "a hidden-state transfer (teacher side)")
        if self.metric not in HIDDEN_METRICS:
            raise InputError(f"unknown hidden-state metric {self.metric!r}: choose one of {', '.join(HIDDEN_METRICS)}")
        if self.projection is not None and not (isinstance(self.projection, str) and self.projection
                                                and "/" not in self.projection):
            raise InputError(f"a projection is named by a string without '/', got {self.projection!r}")
        _check_companion_name(self.teacher, "a hidden-state transfer")
        _check_weight(self.weight, "a hidden-state transfer")

    @property
    def extras(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class AttentionTransfer:
    """KL(teacher rows || student rows) of the attention of student block ``student_layer`` and companion
    ``teacher``'s block ``teacher_layer``, per query position, at attention temperature ``temperature``, with
    the query heads of each model brought to a common grouping (gemmalab.train.transfer.head_groups); the
    backends compute it ``query_chunk`` query rows at a time."""

    student_layer: int
    teacher_layer: int
    temperature: float = 1.0
    teacher: str = "teacher"
    query_chunk: int = 128
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check_layer(self.student_layer, "an attention transfer (student side)")
        _check_layer(self.teacher_layer, "an attention transfer (teacher side)")
        _check_temperature(self.temperature)
        if isinstance(self.query_chunk, bool) or not isinstance(self.query_chunk, int) or self.query_chunk < 1:
            raise InputError(f"query_chunk must be a whole number >= 1, got {self.query_chunk!r}")
        _check_companion_name(self.teacher, "an attention transfer")
        _check_weight(self.weight, "an attention transfer")

    @property
    def extras(self) -> tuple[str, ...]:
        return ()


def _check_companion_name(name: object, what: str) -> None:
    if not (isinstance(name, str) and name):
        raise InputError(f"{what} needs the name of its companion model, got teacher={name!r}")


DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")


@dataclass(frozen=True)
class Distillation:
    """A divergence (``DIVERGENCES``, see the module docstring) of the student's distribution from the
    companion model ``teacher``'s, over their shared vocabulary, at temperature ``temperature`` or, when
    ``temperature_input`` names one, at the per-step scalar of that name (``accumulate(scalars=...)``)."""

    divergence: str = "fkl"
    beta: float = 0.5  # jsd only: the teacher's share of the mixture (0 = forward KL, 1 = reverse KL)
    temperature: float = 2.0
    t2_scaling: bool = True
    teacher: str = "teacher"
    temperature_input: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise InputError(f"unknown divergence {self.divergence!r}: choose one of {', '.join(DIVERGENCES)}")
        if not (_is_number(self.beta) and 0.0 <= self.beta <= 1.0):
            raise InputError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.beta!r}")
        _check_temperature(self.temperature)
        _check_companion_name(self.teacher, "a distillation term")
        if self.temperature_input is not None and not (isinstance(self.temperature_input, str) and self.temperature_input):
            raise InputError(f"temperature_input must be the name of a per-step scalar or None, got {self.temperature_input!r}")
        _check_weight(self.weight, "a distillation term")

    @property
    def extras(self) -> tuple[str, ...]:
        return ()

    @property
    def companions(self) -> tuple[str, ...]:
        return (self.teacher,)

    @property
    def scalars(self) -> tuple[str, ...]:
        return () if self.temperature_input is None else (self.temperature_input,)

    def temperature_at(self, scalars: Mapping[str, float] | None) -> float:
        """The temperature of this step: the scalar ``temperature_input`` names, else ``temperature``."""
        if self.temperature_input is None:
            return self.temperature
        if not scalars or self.temperature_input not in scalars:
            raise InputError(f"the distillation term reads its temperature from the scalar {self.temperature_input!r}: "
                             f"pass scalars={{{self.temperature_input!r}: value}}")
        return scalars[self.temperature_input]


ESTIMATORS = ("top-k", "sampled")


@dataclass(frozen=True)
class CachedDistillation:
    """Distillation from cached sparse teacher targets (see the module docstring): the per-position extras
    ``ids`` (int32 [batch, seq, k]), ``logprobs`` (float32 [batch, seq, k]) and, for the ``top-k``
    estimator only, ``tail`` (float32 [batch, seq]); the student at temperature ``temperature``."""

    estimator: str = "top-k"
    ids: str = "teacher_ids"
    logprobs: str = "teacher_logprobs"
    tail: str = "teacher_tail"
    temperature: float = 1.0
    t2_scaling: bool = True
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise InputError(f"unknown estimator {self.estimator!r} for cached distillation: choose one of "
                             f"{', '.join(ESTIMATORS)}")
        _check_temperature(self.temperature)
        names = self.extras
        if not all(isinstance(name, str) and name for name in names) or len(set(names)) != len(names):
            raise InputError(f"a cached distillation term needs distinct names for its extra inputs, got {names!r}")
        _check_weight(self.weight, "a cached distillation term")

    @property
    def extras(self) -> tuple[str, ...]:
        return (self.ids, self.logprobs, self.tail) if self.estimator == "top-k" else (self.ids, self.logprobs)


HeadTerm = CrossEntropy | SoftTargetCrossEntropy | Distillation | CachedDistillation
AuxTerm = HiddenStateMSE | AttentionKL
TransferTerm = HiddenStateTransfer | AttentionTransfer


@dataclass(frozen=True)
class LossSpec:
    """The terms of the trainer's loss: ``head`` on the logits (chunked), ``aux`` on captured tensors against
    given targets, ``transfer`` on captured tensors against a companion's."""

    head: tuple[HeadTerm, ...] = (CrossEntropy(),)
    aux: tuple[AuxTerm, ...] = field(default=())
    transfer: tuple[TransferTerm, ...] = field(default=())

    def __post_init__(self) -> None:
        # Lists are accepted for convenience; stored as tuples so the spec stays hashable (jit-static).
        object.__setattr__(self, "head", tuple(self.head))
        object.__setattr__(self, "aux", tuple(self.aux))
        object.__setattr__(self, "transfer", tuple(self.transfer))
        if not self.head:
            raise InputError("a loss needs at least one term on the logits (e.g. CrossEntropy())")
        for term in self.head:
            if not isinstance(term, (CrossEntropy, SoftTargetCrossEntropy, Distillation, CachedDistillation)):
                raise InputError(f"{type(term).__name__} is not a loss on the logits: put it in aux=")
        for term in self.aux:
            if not isinstance(term, (HiddenStateMSE, AttentionKL)):
                raise InputError(f"{type(term).__name__} is not an auxiliary loss: put it in head=")
        for term in self.transfer:
            if not isinstance(term, (HiddenStateTransfer, AttentionTransfer)):
                raise InputError(f"{type(term).__name__} is not a transfer term (HiddenStateTransfer, AttentionTransfer)")

    @property
    def extras(self) -> tuple[str, ...]:
        """Names of the per-batch extra inputs the terms read, each once, in order."""
        return tuple(dict.fromkeys(name for term in self.head + self.aux for name in term.extras))

    @property
    def head_extras(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for term in self.head for name in term.extras))

    @property
    def companions(self) -> tuple[str, ...]:
        """Names of the companion models (frozen teachers) the terms read, each once, in order."""
        return tuple(dict.fromkeys([t.teacher for t in self.head if isinstance(t, Distillation)]
                                   + [t.teacher for t in self.transfer]))

    @property
    def head_companions(self) -> tuple[str, ...]:
        """The companions whose output head runs beside the student's (the Distillation terms' teachers)."""
        return tuple(dict.fromkeys(t.teacher for t in self.head if isinstance(t, Distillation)))

    @property
    def terms(self) -> tuple[HeadTerm | AuxTerm | TransferTerm, ...]:
        """Every term, in the order of ``term_names``: head, aux, transfer."""
        return self.head + self.aux + self.transfer

    @property
    def scalars(self) -> tuple[str, ...]:
        """Names of the per-step scalars the terms read (``accumulate(scalars=...)``), each once, in order."""
        return tuple(dict.fromkeys(name for t in self.head if isinstance(t, Distillation) for name in t.scalars))

    def term_names(self) -> tuple[str, ...]:
        """One unique name per term, head terms, then aux terms, then transfer terms (the keys of per-component
        metrics):
        ``cross_entropy``, ``soft_target_cross_entropy``, ``distillation``, ``cached_distillation``,
        ``hidden_mse_<layer>``, ``attention_kl_<layer>``, ``hidden_transfer_<student layer>``,
        ``attention_transfer_<student layer>``, with ``_2``, ``_3``, ... on the second and later use of a name."""
        seen: dict[str, int] = {}
        names = []
        for term in self.terms:
            base = _term_name(term)
            seen[base] = seen.get(base, 0) + 1
            names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
        return tuple(names)

    def hidden_layers(self) -> tuple[int, ...]:
        """The student's hidden-state indices the aux and transfer terms read (the trainer captures these),
        sorted."""
        return tuple(sorted({t.layer for t in self.aux if isinstance(t, HiddenStateMSE)}
                            | {t.student_layer for t in self.transfer if isinstance(t, HiddenStateTransfer)}))

    def attention_layers(self) -> tuple[int, ...]:
        """Layers whose attention probabilities the aux terms read (only these leave the fused kernel)."""
        return tuple(sorted({t.layer for t in self.aux if isinstance(t, AttentionKL)}))

    def query_key_layers(self) -> tuple[int, ...]:
        """The student's blocks whose queries and keys the attention transfer terms read, sorted (captured
        beside the fused kernel, which stays on)."""
        return tuple(sorted({t.student_layer for t in self.transfer if isinstance(t, AttentionTransfer)}))

    def companion_hidden_layers(self, name: str) -> tuple[int, ...]:
        """Companion ``name``'s hidden-state indices the transfer terms read, sorted."""
        return tuple(sorted({t.teacher_layer for t in self.transfer
                             if isinstance(t, HiddenStateTransfer) and t.teacher == name}))

    def companion_query_key_layers(self, name: str) -> tuple[int, ...]:
        """Companion ``name``'s blocks whose queries and keys the attention transfer terms read, sorted."""
        return tuple(sorted({t.teacher_layer for t in self.transfer
                             if isinstance(t, AttentionTransfer) and t.teacher == name}))

    @property
    def projections(self) -> tuple[str, ...]:
        """Names of the trainable loss parameters (hidden-state projections) the terms use, each once."""
        return tuple(dict.fromkeys(t.projection for t in self.transfer
                                   if isinstance(t, HiddenStateTransfer) and t.projection is not None))

    @property
    def plain_cross_entropy(self) -> bool:
        """One cross-entropy term and nothing else: the case backends give a hand-written fused gradient."""
        return len(self.head) == 1 and isinstance(self.head[0], CrossEntropy) and not self.aux and not self.transfer


def _term_name(term: HeadTerm | AuxTerm | TransferTerm) -> str:
    if isinstance(term, HiddenStateTransfer):
        return f"hidden_transfer_{term.student_layer}"
    if isinstance(term, AttentionTransfer):
        return f"attention_transfer_{term.student_layer}"
    if isinstance(term, HiddenStateMSE):
        return f"hidden_mse_{term.layer}"
    if isinstance(term, AttentionKL):
        return f"attention_kl_{term.layer}"
    return {CrossEntropy: "cross_entropy", SoftTargetCrossEntropy: "soft_target_cross_entropy",
            Distillation: "distillation", CachedDistillation: "cached_distillation"}[type(term)]


def distillation_loss(
    alpha: float = 0.5,
    temperature: float = 2.0,
    divergence: str = "fkl",
    beta: float = 0.5,
    label_smoothing: float = 0.0,
    *,
    t2_scaling: bool = True,
    teacher: str = "teacher",
    temperature_input: str | None = None,
) -> LossSpec:
    """``alpha * CE + (1 - alpha) * KD``: the label-smoothed cross-entropy on the hard targets and a
    Distillation term from companion ``teacher``. Both terms are kept whatever alpha (a weight may be 0), so
    per-component metrics always show both."""
    if not (_is_number(alpha) and 0.0 <= alpha <= 1.0):
        raise InputError(f"alpha (the cross-entropy's share of the loss) must be in [0, 1], got {alpha!r}")
    return LossSpec(head=(
        CrossEntropy(label_smoothing=label_smoothing, weight=float(alpha)),
        Distillation(divergence=divergence, beta=beta, temperature=temperature, t2_scaling=t2_scaling,
                     teacher=teacher, temperature_input=temperature_input, weight=1.0 - float(alpha)),
    ))


def cached_distillation_loss(
    alpha: float = 0.5,
    estimator: str = "top-k",
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
    *,
    t2_scaling: bool = True,
) -> LossSpec:
    """``alpha * CE + (1 - alpha) * cached KD``: the label-smoothed cross-entropy on the hard targets and a
    CachedDistillation term reading the default extras (``teacher_ids``, ``teacher_logprobs`` and, for top-k,
    ``teacher_tail``). Both terms are kept whatever alpha, as in ``distillation_loss``."""
    if not (_is_number(alpha) and 0.0 <= alpha <= 1.0):
        raise InputError(f"alpha (the cross-entropy's share of the loss) must be in [0, 1], got {alpha!r}")
    return LossSpec(head=(
        CrossEntropy(label_smoothing=label_smoothing, weight=float(alpha)),
        CachedDistillation(estimator=estimator, temperature=temperature, t2_scaling=t2_scaling,
                           weight=1.0 - float(alpha)),
    ))


# --- numpy definitions --------------------------------------------------------------------------------------
def perplexity_from_loss(loss: float) -> float:
    """exp(mean loss per token), capped at exp(700) so a diverged model's perplexity stays a float."""
    return math.exp(min(loss, 700.0))


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


def shared_vocab(student_vocab: int, teacher_vocab: int) -> int:
    """The number of ids a student and a teacher both score: the first ``min`` of their vocabularies. Gemma 3
    4B and larger have 262208 ids, 1B and 270M 262144, the 64 extra ones at the end: the first 262144 ids
    are the same tokens in every size."""
    return min(int(student_vocab), int(teacher_vocab))


def restrict(logits: np.ndarray, shared: int) -> np.ndarray:
    """Logits [..., vocab] restricted to the first ``shared`` ids. The softmax of the restricted logits is
    the model's distribution restricted to the shared ids and renormalised over them (p_v / sum_shared p),
    so a teacher's mass on ids the student cannot produce is dropped, not pushed onto the others unevenly."""
    return np.asarray(logits)[..., :shared]


def _kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """KL(p || q) over the last axis, from log-probabilities (finite: computed by log_softmax)."""
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def divergence(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    kind: str,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    t2_scaling: bool = True,
) -> np.ndarray:
    """Per-position divergence [...] of float logits [..., vocab] (both already restricted to the same ids,
    ``restrict``), in float64: the formulas of the module docstring. Every logarithm is a log-softmax (and
    the jsd mixture's a log-sum-exp of them), so none meets 0 and no LOG_FLOOR is needed."""
    if kind not in DIVERGENCES:
        raise InputError(f"unknown divergence {kind!r}: choose one of {', '.join(DIVERGENCES)}")
    z_s, z_t = np.asarray(student_logits, np.float64), np.asarray(teacher_logits, np.float64)
    if z_s.shape != z_t.shape:
        raise InputError(f"student and teacher logits have shapes {list(z_s.shape)} and {list(z_t.shape)}: "
                         "restrict both to shared_vocab(...) ids first")
    log_s, log_t = log_softmax(z_s / temperature), log_softmax(z_t / temperature)
    if kind == "fkl" or (kind == "jsd" and beta == 0):
        per_position = _kl(log_t, log_s)
    elif kind == "rkl" or (kind == "jsd" and beta == 1):
        per_position = _kl(log_s, log_t)
    elif kind == "jsd":
        log_m = np.logaddexp(log_s + np.log1p(-beta), log_t + np.log(beta))  # log((1 - beta) p_s + beta p_t)
        per_position = beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
    else:
        per_position = 0.5 * np.abs(np.exp(log_t) - np.exp(log_s)).sum(axis=-1)
    return temperature**2 * per_position if t2_scaling else per_position


def cached_distillation(term: CachedDistillation, logits: np.ndarray, extras: Mapping[str, np.ndarray]) -> np.ndarray:
    """The per-position loss [...] of a CachedDistillation term on logits [..., vocab], float64: the estimators
    of gemmalab.distill.sparse (their one definition), times T^2 when ``t2_scaling``."""
    # Imported here: gemmalab.distill imports the training package, which imports this module.
    from ..distill.sparse import SparseTargets, sampled_cross_entropy, sparse_kl

    ids, logprobs = np.asarray(extras[term.ids]), np.asarray(extras[term.logprobs])
    if term.estimator == "top-k":
        per_position = sparse_kl(logits, SparseTargets(ids, logprobs, np.asarray(extras[term.tail])), term.temperature)
    else:
        no_tail = np.full(ids.shape[:-1], np.nan, np.float32)  # sampled targets carry none
        per_position = sampled_cross_entropy(logits, SparseTargets(ids, logprobs, no_tail), term.temperature)
    return term.temperature**2 * per_position if term.t2_scaling else per_position


def head_term(
    term: HeadTerm,
    logits: np.ndarray,
    targets: np.ndarray,
    extras: dict[str, np.ndarray],
    companion_logits: dict[str, np.ndarray] | None = None,
    scalars: dict[str, float] | None = None,
) -> np.ndarray:
    """The per-position loss of one head term (without its weight); ``companion_logits`` holds each
    companion's full (soft-capped) logits [batch, seq, its vocab], ``scalars`` the step's scalars."""
    if isinstance(term, CrossEntropy):
        return cross_entropy(logits, targets, term.label_smoothing)
    if isinstance(term, SoftTargetCrossEntropy):
        return soft_target_cross_entropy(logits, extras[term.targets], term.temperature)
    if isinstance(term, CachedDistillation):
        return cached_distillation(term, logits, extras)
    if not companion_logits or term.teacher not in companion_logits:
        raise InputError(f"the distillation term reads the companion {term.teacher!r}: pass its logits in "
                         f"companion_logits={{{term.teacher!r}: array}}")
    teacher = np.asarray(companion_logits[term.teacher])
    shared = shared_vocab(np.shape(logits)[-1], teacher.shape[-1])
    return divergence(restrict(logits, shared), restrict(teacher, shared), term.divergence, beta=term.beta,
                      temperature=term.temperature_at(scalars), t2_scaling=term.t2_scaling)


def aux_term(term: AuxTerm, extras: dict[str, np.ndarray], hidden_states: dict[int, np.ndarray] | None,
             attentions: dict[int, np.ndarray] | None) -> np.ndarray:
    """The per-position loss of one auxiliary term (without its weight), from the captured tensors."""
    if isinstance(term, HiddenStateMSE):
        return hidden_state_mse(hidden_states[term.layer], extras[term.targets])
    return attention_kl(attentions[term.layer], extras[term.targets])


def term_sums(
    spec: LossSpec,
    logits: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    extras: dict[str, np.ndarray] | None = None,
    hidden_states: dict[int, np.ndarray] | None = None,
    attentions: dict[int, np.ndarray] | None = None,
    *,
    companion_logits: dict[str, np.ndarray] | None = None,
    scalars: dict[str, float] | None = None,
    companion_captures: dict[str, dict[str, list]] | None = None,
    companion_groups: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    loss_parameters: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """{term name (``spec.term_names()``): sum over positions of position weight * per-position loss}, the
    term's own weight not applied, in float64: the definition of the trainers' ``term_sums()``. The transfer
    terms read the student's ``hidden_states`` and ``attentions`` (by index), each companion's captures
    (``{"hidden_states": [...], "attentions": [...]}``, as ``reference.forward(..., capture=True)`` returns
    them), the head groups of the student and each companion (``transfer.head_groups``) and the loss
    parameters (the projections)."""
    from . import transfer  # transfer imports this module

    extras = extras or {}
    w = np.asarray(weights, np.float64)
    per_position = [head_term(term, logits, targets, extras, companion_logits, scalars) for term in spec.head]
    per_position += [aux_term(term, extras, hidden_states, attentions) for term in spec.aux]
    student = {"hidden_states": hidden_states or {}, "attentions": attentions or {}}
    per_position += [transfer.transfer_term(term, student, companion_captures or {}, loss_parameters,
                                            (companion_groups or {}).get(term.teacher))
                     for term in spec.transfer]
    return {name: float(np.sum(w * value)) for name, value in zip(spec.term_names(), per_position, strict=True)}


def loss_sum(
    spec: LossSpec,
    logits: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    extras: dict[str, np.ndarray] | None = None,
    hidden_states: dict[int, np.ndarray] | None = None,
    attentions: dict[int, np.ndarray] | None = None,
    *,
    companion_logits: dict[str, np.ndarray] | None = None,
    scalars: dict[str, float] | None = None,
    companion_captures: dict[str, dict[str, list]] | None = None,
    companion_groups: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    loss_parameters: dict[str, np.ndarray] | None = None,
) -> float:
    """The whole loss of ``spec`` from full logits [batch, seq, vocab], the captured tensors it reads and
    the companions' full logits and captures, in float64: the definition the chunked backends compute (each
    term's sum, ``term_sums``, times its weight)."""
    sums = term_sums(spec, logits, targets, weights, extras, hidden_states, attentions,
                     companion_logits=companion_logits, scalars=scalars, companion_captures=companion_captures,
                     companion_groups=companion_groups, loss_parameters=loss_parameters)
    terms = spec.terms
    return float(sum(term.weight * sums[name] for name, term in zip(spec.term_names(), terms, strict=True)))


__all__ = [
    "DIVERGENCES",
    "ESTIMATORS",
    "LOG_FLOOR",
    "HIDDEN_METRICS",
    "AttentionKL",
    "AttentionTransfer",
    "AuxTerm",
    "CachedDistillation",
    "CrossEntropy",
    "Distillation",
    "HeadTerm",
    "HiddenStateMSE",
    "HiddenStateTransfer",
    "LossSpec",
    "SoftTargetCrossEntropy",
    "TransferTerm",
    "attention_kl",
    "aux_term",
    "cached_distillation",
    "cached_distillation_loss",
    "cross_entropy",
    "distillation_loss",
    "divergence",
    "head_term",
    "hidden_state_mse",
    "log_softmax",
    "loss_sum",
    "perplexity_from_loss",
    "restrict",
    "shared_vocab",
    "soft_target_cross_entropy",
    "term_sums",
]
