"""Feature transfer between a student and a frozen companion model (a teacher): the numpy definitions of the
transfer terms of gemmalab.train.losses, the rule that brings two models' attention heads to a common form,
and the trainable *loss parameters* (the hidden-state projections), which belong to the loss, not to
either model.

Hidden states (``HiddenStateTransfer``), per position, with h_s the student's hidden state [Ds], h_t the
teacher's [Dt] and P the projection [Dt, Ds] (the identity when none is named)::

    cosine:  1 - (P h_s) . h_t / max(|P h_s| |h_t|, 1e-8)
    mse:     mean over the Dt features of (P h_s - h_t)^2

Gemma's residual stream grows to magnitudes in the hundreds in real checkpoints, so the cosine (which
ignores the scale) is the default; the mean squared error compares scales too.

Attention rows (``AttentionTransfer``), per query position: each model's attention probabilities of the
mapped block at attention temperature tau (softmax(scores / tau) over the keys the row may see), its query
heads averaged into G common groups by ``head_groups`` (a mean of distributions is a distribution), then
``mean over the G groups of KL(T_g || S_g)`` with ``0 log 0 = 0``. The student's row spans the keys its own
layer may see (its causal rule and, on a local layer, its window); the teacher's row is renormalised over
the keys both layers may see, so a global teacher layer mapped onto a local student layer is compared on
the student's window (as ``losses.restrict`` drops the teacher's ids the student cannot produce). Every
query sees itself under the causal rule, so no row is empty (explicit masks are checked for it).

The common form of the heads (``head_groups``): when both models have the same query heads and the same
key/value heads, head h is compared with head h. Otherwise each model's query heads are averaged within
G = gcd(kv heads of the student, kv heads of the teacher) consecutive blocks of whole kv groups (query head
h belongs to kv head h // (heads / kv heads), so a block is a run of consecutive query heads): with equal
kv-head counts that is the mean within each kv group; with counts that do not divide, the groups merge
until they line up; with a single kv head on either side, the mean over all heads.

The projections: ``HiddenStateTransfer.projection`` names a float32 matrix [teacher hidden, student hidden]
that trains with the student (in the optimizer and its state, under its name) and is saved with the run for
``--resume``, never in the student's checkpoint. It starts as torch.nn.Linear's weight does, uniform in
+-1/sqrt(student hidden), from the run's seed (``init_loss_parameters``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from ..config import Gemma3Config
from ..errors import InputError
from ..params import parameter_shapes
from ..randomness import named_rng
from .losses import LOG_FLOOR, AttentionTransfer, HiddenStateTransfer, LossSpec

COSINE_EPS = 1e-8  # the floor of |P h_s| |h_t|: only a zero vector meets it


# --- the common form of two models' heads -------------------------------------------------------------------
def head_groups(student_heads: int, student_kv_heads: int, teacher_heads: int,
                teacher_kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(student [G, Hs], teacher [G, Ht]) float32 averaging matrices: row g holds 1/n on the n query heads of
    common group g (see the module docstring), so ``groups @ probs`` over the head axis gives the G group
    rows of each model."""
    for heads, kv, who in ((student_heads, student_kv_heads, "student"), (teacher_heads, teacher_kv_heads, "teacher")):
        if kv < 1 or heads % kv:
            raise InputError(f"the {who} has {heads} query heads for {kv} key/value heads: each kv head must serve "
                             "a whole number of query heads")
    if student_heads == teacher_heads and student_kv_heads == teacher_kv_heads:
        eye = np.eye(student_heads, dtype=np.float32)
        return eye, eye.copy()
    common = math.gcd(student_kv_heads, teacher_kv_heads)
    return _block_means(student_heads, common), _block_means(teacher_heads, common)


def _block_means(heads: int, groups: int) -> np.ndarray:
    per_group = heads // groups
    matrix = np.zeros((groups, heads), np.float32)
    for g in range(groups):
        matrix[g, g * per_group : (g + 1) * per_group] = 1.0 / per_group
    return matrix


def attention_groups(term: AttentionTransfer, student: Gemma3Config, teacher: Gemma3Config) -> tuple[np.ndarray, np.ndarray]:
    """``head_groups`` of the two models an attention transfer term compares."""
    del term  # every block of a Gemma 3 model has the same heads; the term is the argument for clarity
    return head_groups(student.num_attention_heads, student.num_key_value_heads, teacher.num_attention_heads,
                       teacher.num_key_value_heads)


# --- numpy definitions --------------------------------------------------------------------------------------
def hidden_transfer(student_hidden: np.ndarray, teacher_hidden: np.ndarray, metric: str,
                    projection: np.ndarray | None = None) -> np.ndarray:
    """Per-position loss [...] of hidden states [..., Ds] and [..., Dt], float64 (the module docstring)."""
    h = np.asarray(student_hidden, np.float64)
    if projection is not None:
        h = h @ np.asarray(projection, np.float64).T  # [..., Dt]
    t = np.asarray(teacher_hidden, np.float64)
    if metric == "mse":
        return np.mean((h - t) ** 2, axis=-1)
    norms = np.linalg.norm(h, axis=-1) * np.linalg.norm(t, axis=-1)
    return 1.0 - (h * t).sum(-1) / np.maximum(norms, COSINE_EPS)


def _tempered(probs: np.ndarray, visible: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(scores / tau) over ``visible`` keys from the probabilities softmax(scores): log p differs from
    the scores by a constant per row, which the softmax removes."""
    logits = np.where(visible, np.log(np.maximum(probs, LOG_FLOOR)) / temperature, -np.inf)
    logits = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def attention_transfer(student_probs: np.ndarray, teacher_probs: np.ndarray, student_groups: np.ndarray,
                       teacher_groups: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Per (batch, query) loss [batch, seq], float64, of attention probabilities [batch, Hs, seq, keys] and
    [batch, Ht, seq, keys] at temperature 1 (what a forward pass captures), with the averaging matrices of
    ``head_groups``. The keys a row may see are those its probabilities reach: a softmax gives every visible
    key a positive probability and a masked one exactly 0."""
    s_probs, t_probs = np.asarray(student_probs, np.float64), np.asarray(teacher_probs, np.float64)
    s_visible = (s_probs > 0).any(axis=1, keepdims=True)  # [batch, 1, seq, keys]: every head sees alike
    s = _tempered(s_probs, s_visible, temperature)
    t = _tempered(t_probs, (t_probs > 0).any(axis=1, keepdims=True) & s_visible, temperature)
    s_g = np.einsum("gh,bhqk->bgqk", np.asarray(student_groups, np.float64), s)
    t_g = np.einsum("gh,bhqk->bgqk", np.asarray(teacher_groups, np.float64), t)
    kl = np.where(t_g > 0, t_g * (np.log(np.maximum(t_g, LOG_FLOOR)) - np.log(np.maximum(s_g, LOG_FLOOR))), 0.0)
    return kl.sum(-1).mean(axis=1)


def hidden_state_at(captures: Mapping[str, list], index: int) -> np.ndarray:
    """Hidden state ``index`` of a reference capture (``reference.forward(..., capture=True)``), transformers'
    convention; the last one is after the final norm."""
    return np.asarray(captures["hidden_states"][index])


def transfer_term(term: HiddenStateTransfer | AttentionTransfer, student: Mapping[str, list],
                  companions: Mapping[str, Mapping[str, list]], loss_parameters: Mapping[str, np.ndarray] | None,
                  groups: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The per-position loss [batch, seq] of one transfer term from reference captures of the student and of
    each companion ({"hidden_states": [...], "attentions": [...]}), float64; ``groups`` are the attention
    term's averaging matrices (``attention_groups``)."""
    if term.teacher not in companions:
        raise InputError(f"the transfer term reads the companion {term.teacher!r}: pass its captures in "
                         f"companion_captures={{{term.teacher!r}: ...}}")
    teacher = companions[term.teacher]
    if isinstance(term, HiddenStateTransfer):
        projection = None if term.projection is None else (loss_parameters or {})[term.projection]
        return hidden_transfer(hidden_state_at(student, term.student_layer), hidden_state_at(teacher, term.teacher_layer),
                               term.metric, projection)
    if groups is None:
        raise InputError("an attention transfer term needs its head groups (transfer.attention_groups)")
    return attention_transfer(student["attentions"][term.student_layer], teacher["attentions"][term.teacher_layer],
                              *groups, temperature=term.temperature)


# --- the loss parameters ------------------------------------------------------------------------------------
def loss_parameter_shapes(loss: LossSpec, student: Gemma3Config,
                          companions: Mapping[str, Gemma3Config]) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the trainable loss parameters of ``loss`` (its projections), after checking every
    transfer term against the two models (``check_transfer``)."""
    check_transfer(loss, student, companions)
    model_names = parameter_shapes(student)
    shapes: dict[str, tuple[int, ...]] = {}
    for term in loss.transfer:
        if isinstance(term, HiddenStateTransfer) and term.projection is not None:
            if term.projection in model_names:  # one optimizer state holds both: "<state>/<name>"
                raise InputError(f"the projection {term.projection!r} has the name of a parameter of the student: "
                                 "name it otherwise (e.g. hidden_projection.<block>)")
            shape = (companions[term.teacher].hidden_size, student.hidden_size)
            if shapes.setdefault(term.projection, shape) != shape:
                raise InputError(f"the projection {term.projection!r} is shared by terms that need the shapes "
                                 f"{list(shapes[term.projection])} and {list(shape)}: give each its own name")
    return shapes


def check_transfer(loss: LossSpec, student: Gemma3Config, companions: Mapping[str, Gemma3Config]) -> None:
    """One InputError line for a transfer term that does not fit the models: a companion it names that is
    missing, a layer outside a model, or hidden widths that differ with no projection to bridge them."""
    for term in loss.transfer:
        if term.teacher not in companions:
            raise InputError(f"a transfer term reads the companion model {term.teacher!r}, which the trainer was not given")
        teacher = companions[term.teacher]
        if isinstance(term, HiddenStateTransfer):
            for layer, config, who in ((term.student_layer, student, "student"), (term.teacher_layer, teacher, "teacher")):
                if layer > config.num_hidden_layers:
                    raise InputError(f"a hidden-state transfer reads the {who}'s hidden state {layer}, but it has "
                                     f"{config.num_hidden_layers + 1} (indices 0 to {config.num_hidden_layers})")
            if term.projection is None and student.hidden_size != teacher.hidden_size:
                raise InputError(f"the student's hidden size is {student.hidden_size} and the teacher's "
                                 f"{teacher.hidden_size}: a hidden-state transfer between them needs a projection "
                                 "(HiddenStateTransfer(projection='name'))")
        else:
            for layer, config, who in ((term.student_layer, student, "student"), (term.teacher_layer, teacher, "teacher")):
                if layer >= config.num_hidden_layers:
                    raise InputError(f"an attention transfer reads the {who}'s block {layer}, but it has "
                                     f"{config.num_hidden_layers} (0 to {config.num_hidden_layers - 1})")
            head_groups(student.num_attention_heads, student.num_key_value_heads, teacher.num_attention_heads,
                        teacher.num_key_value_heads)


def init_loss_parameters(shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh loss parameters, float32: each projection [Dt, Ds] uniform in +-1/sqrt(Ds) (torch.nn.Linear's
    default weight), drawn from ``seed`` and the parameter's name (so adding a term leaves the others' draws
    as they were)."""
    out = {}
    for name, shape in sorted(shapes.items()):
        rng = named_rng(seed, name)
        bound = 1.0 / math.sqrt(shape[-1])
        out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return out


def check_loss_parameters(values: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
                          error: Callable[[str], Exception] = InputError) -> dict[str, np.ndarray]:
    """``values`` as float32 arrays, after checking they are exactly the loss parameters of ``shapes``
    (one line naming a missing, unexpected or misshapen one, or one holding NaN or inf, raised as
    ``error(message)``)."""
    missing = sorted(set(shapes) - set(values))
    if missing:
        raise error(f"the loss parameter {missing[0]!r} {list(shapes[missing[0]])} is missing: pass every "
                    f"projection the loss names ({', '.join(sorted(shapes))})")
    unknown = sorted(set(values) - set(shapes))
    if unknown:
        raise error(f"{unknown[0]!r} is not a loss parameter of this loss (it has "
                    f"{', '.join(sorted(shapes)) or 'none'}): resume with the loss the run was started with")
    out = {}
    for name, shape in shapes.items():
        array = np.asarray(values[name])
        if array.shape != tuple(shape):
            raise error(f"the loss parameter {name!r} has shape {list(array.shape)}, not {list(shape)}: resume with "
                        "the teacher and student the run was started with")
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
            raise error(f"the loss parameter {name!r} holds NaN, infinite or non-float values")
        out[name] = np.ascontiguousarray(array, dtype=np.float32)
    return out


def checked_loss_parameters(loss: LossSpec, student: Gemma3Config, companions: Mapping[str, Gemma3Config],
                            given: Mapping[str, np.ndarray] | None, seed: int = 0) -> dict[str, np.ndarray]:
    """What a trainer starts its loss parameters from: ``given`` (checked), or fresh ones from ``seed``."""
    shapes = loss_parameter_shapes(loss, student, companions)
    if given is None:
        return init_loss_parameters(shapes, seed)
    return check_loss_parameters(given, shapes)


__all__ = [
    "COSINE_EPS",
    "attention_groups",
    "attention_transfer",
    "check_loss_parameters",
    "check_transfer",
    "checked_loss_parameters",
    "head_groups",
    "hidden_state_at",
    "hidden_transfer",
    "init_loss_parameters",
    "loss_parameter_shapes",
    "transfer_term",
]
