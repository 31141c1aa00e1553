"""Training on JAX: the chunked loss, gradient accumulation, clipping and the optimizer step behind
gemmalab.train.spec.BackendTrainer. The formulas are in gemmalab/train/spec.py.

Two jitted functions do the work, both compiled once per shape and then reused step after step:

* ``accumulate``: ``jax.value_and_grad`` of ``loss_scale * chunked_loss_sum`` over the trainable parameters
  only (the model's and the loss's; frozen ones go in as constants, so no gradient is computed for them),
  added into a float32 accumulator that is donated and updated in place;
* ``apply``: divide by the normaliser, global norm, clip, one optax update per parameter, all skipped by a
  ``lax.cond`` when the norm is not finite; parameters, optimizer state and accumulator are donated.

``spec.grad_checkpointing`` wraps each decoder block in ``jax.checkpoint`` (model.text_model's ``remat``): jax
then keeps only each block's input for the backward pass. On XLA:CPU this saves nothing: the compiler drops
the optimisation barriers and merges the recomputation back into the forward pass (the compiled program has
the same matmuls and the same temporary memory with and without it); GPU and TPU keep the barriers.

Each parameter has its own optax state: spec.py counts the step ``t`` per parameter (a block unfrozen at
step 1000 starts at t = 1), and an optax state keeps one count for the tree it was made for. optax's
updates are linear in the learning rate, so the transformations run with a learning rate of 1 and the step
multiplies their update by ``lr * scale`` of each parameter: the learning rate changes every step and per
parameter without recompiling, and is not part of the state.

Where optax is not spec.py's formula, this file writes the piece, in a line or two:

* global-norm clipping: ``optax.clip_by_global_norm`` scales by ``max_norm / norm``; spec.py (and torch,
  MLX) by ``max_norm / (norm + 1e-6)``.
* AdamW is ``optax.adamw`` (bias correction on, ``eps`` outside the square root, ``eps_root=0``, decay
  ``lr * weight_decay * p`` added to the update): spec.py's formula exactly.
* Adafactor is ``optax.adafactor`` for the factored second moment, the ``1 - t^-decay_rate`` schedule,
  ``eps1`` added to ``g^2`` and the update clipping, with ``min_dim_size_to_factor=1`` (its default 128
  leaves small matrices unfactored; spec.py factors every parameter with >= 2 dims), no learning rate, no
  parameter scale, no momentum and no weight decay inside it, because:
  the parameter scale of ``multiply_by_parameter_scale=True`` has its floor fixed at 1e-3 (spec.py's
  ``eps2`` is a setting), so ``optax.scale_by_param_block_rms(eps2)`` is chained after it; its momentum
  would average the update after that parameter scaling (spec.py averages the unscaled update), so
  ``optax.ema(beta1)`` is chained between the two; its ``weight_decay_rate`` decays by ``wd * p``, not
  ``lr * wd * p``, so the step decays the parameter here. optax factors the two largest axes of an array
  where spec.py names the last two: the same for the 2-D matrices of Gemma, whose other parameters are
  1-D. For a matrix with more rows than columns optax divides by the mean of the column statistics where
  spec.py divides by the mean of the row statistics: both are the same running mean of ``g^2 + eps1``.

The optimizer state crosses the boundary in spec.py's names, translated leaf by leaf (``optax_state_names``):
optax's paths (``adamw.0.mu``, ``adafactor.0.v_row``, ...) renamed, its int32 0-d count as the int64 [1]
step, its [1] placeholders dropped, R and C swapped where optax keeps them under each other's names (a
matrix with more rows than columns), and the momentum negated (optax averages -u, spec.py u).

Companion models (frozen distillation teachers, ``Trainer(..., companions=)``) enter ``accumulate`` as their
own parameter trees, an argument that is never differentiated, in their own dtype; their backbone runs once
under ``stop_gradient``, capturing what the transfer terms read, and for the Distillation terms' teachers
(``loss.head_companions``) their output head runs per chunk inside the loss's scan, beside the student's. The
step's scalars (a scheduled temperature) are traced arguments: a new value each step compiles nothing.

The transfer terms (gemmalab/train/transfer.py has their definitions) come after the head and aux terms.
A hidden-state transfer compares the student's captured hidden state, through a projection, with the
companion's, in float32. An attention transfer reads each model's queries and keys of the mapped block
(captured beside the fused attention kernel, model.Gemma3Output.queries_keys) and forms the attention rows
``term.query_chunk`` queries at a time in a checkpointed ``lax.scan``, as the head's chunks: a layer's
[batch, heads, seq, seq] probabilities never exist at once, in the forward or the backward pass.

The loss parameters (the projections) are float32 parameters outside the model, under their own names:
the trainer holds them beside the model's and hands both to the two jitted functions in the same dicts, so
they are differentiated, clipped, updated, decayed and kept in the optimizer state exactly as the model's
are. A loss without projections has none, and compiles the same functions as before.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemmalab.checks import is_count
from gemmalab.config import Gemma3Config
from gemmalab.errors import BackendError, InputError
from gemmalab.train.inputs import StepInputs, prepare
from gemmalab.train.losses import (
    LOG_FLOOR,
    AttentionTransfer,
    AuxTerm,
    CachedDistillation,
    CrossEntropy,
    Distillation,
    HeadTerm,
    HiddenStateMSE,
    HiddenStateTransfer,
    LossSpec,
    TransferTerm,
    shared_vocab,
)
from gemmalab.train.spec import OptimizerSpec, TrainSpec, check_companions, check_optimizer_state
from gemmalab.train.transfer import COSINE_EPS, attention_groups, checked_loss_parameters

from .linears import wrappers
from .model import (
    DTYPES,
    Gemma3Output,
    Hint,
    Masks,
    Params,
    QueriesKeys,
    Rope,
    default_masks,
    flatten,
    logits_from_hidden,
    no_hint,
    output_weight,
    rebuild,
    soft_cap,
    text_model,
)
from .sharding import Plan

if TYPE_CHECKING:
    from .backend import JaxModel

COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# --- the loss terms (gemmalab/train/losses.py has their definitions) --------------------------------------------
def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    return (jnp.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def divergence(student: jax.Array, teacher: jax.Array, term: Distillation, temperature: float | jax.Array) -> jax.Array:
    """Per-position divergence [n] of float32 logits [n, shared] (losses.divergence has the formulas); the
    temperature may be traced (a scheduled one: no recompilation when it changes)."""
    log_s = jax.nn.log_softmax(student / temperature, axis=-1)
    log_t = jax.nn.log_softmax(teacher / temperature, axis=-1)
    kind, beta = term.divergence, term.beta
    if kind == "fkl" or (kind == "jsd" and beta == 0):
        per_position = _kl(log_t, log_s)
    elif kind == "rkl" or (kind == "jsd" and beta == 1):
        per_position = _kl(log_s, log_t)
    elif kind == "jsd":
        log_m = jnp.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))  # the mixture
        per_position = beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
    else:
        per_position = 0.5 * jnp.abs(jnp.exp(log_t) - jnp.exp(log_s)).sum(axis=-1)
    return temperature**2 * per_position if term.t2_scaling else per_position


def cached_distillation(logits: jax.Array, term: CachedDistillation, ids: jax.Array, logprobs: jax.Array,
                        tail: jax.Array | None) -> jax.Array:
    """Per-position loss [n] of float32 logits [n, vocab] against cached teacher targets: ids int32 [n, k],
    their log-probabilities [n, k] and, for top-k, the tail mass [n] (losses.cached_distillation has the
    formulas). log q_rest is a log-sum-exp over the ids not kept (the kept ones masked to -inf), not
    log(1 - sum q_kept): that difference loses q_rest to cancellation in float32 once the kept ids hold
    nearly all the mass, which is when its gradient matters most."""
    z = logits / term.temperature
    lse = jax.nn.logsumexp(z, axis=-1)  # [n]
    log_q = jnp.take_along_axis(z, ids, axis=-1) - lse[:, None]  # [n, k]
    if term.estimator == "sampled":
        per_position = -log_q.mean(axis=-1)
    else:
        rows = jnp.arange(z.shape[0])[:, None]
        kept = jnp.zeros(z.shape, bool).at[rows, ids].set(True)  # [n, vocab]
        # A row whose kept ids cover the vocabulary (k = vocabulary) has no rest bucket: its rest term is 0.
        # Its mask is lifted, so no log-sum-exp runs over -inf alone (a NaN in the backward pass).
        has_rest = ~kept.all(axis=-1)  # [n]
        log_q_rest = jax.nn.logsumexp(jnp.where(kept & has_rest[:, None], -jnp.inf, z), axis=-1) - lse  # [n]
        rest = tail * (jnp.log(jnp.maximum(tail, LOG_FLOOR)) - log_q_rest)  # 0 log 0 = 0 at r = 0
        per_position = (jnp.exp(logprobs) * (logprobs - log_q)).sum(axis=-1) + jnp.where(has_rest, rest, 0.0)
    return term.temperature**2 * per_position if term.t2_scaling else per_position


def head_term(term: HeadTerm, logits: jax.Array, targets: jax.Array, extras: Mapping[str, jax.Array],
              companions: Mapping[str, jax.Array] | None = None,
              scalars: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """One head term's per-position loss [chunk] of float32 logits [chunk, vocab] (its weight not applied);
    ``companions`` holds each companion's float32 logits of the chunk over the shared ids [chunk, shared],
    ``scalars`` the step's (traced) scalars."""
    if isinstance(term, Distillation):
        teacher = companions[term.teacher]
        return divergence(logits[:, : teacher.shape[-1]], teacher, term, term.temperature_at(scalars))
    if isinstance(term, CachedDistillation):
        tail = extras[term.tail] if term.estimator == "top-k" else None
        return cached_distillation(logits, term, extras[term.ids], extras[term.logprobs], tail)
    if isinstance(term, CrossEntropy):
        lse = jax.nn.logsumexp(logits, axis=-1)  # [chunk]
        nll = lse - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]  # -log p(target)
        if term.label_smoothing:
            # mean_v -log p(v) = lse - mean_v logits
            nll = (1 - term.label_smoothing) * nll + term.label_smoothing * (lse - logits.mean(axis=-1))
        return nll
    t = term.temperature
    return t**2 * -(extras[term.targets] * jax.nn.log_softmax(logits / t, axis=-1)).sum(axis=-1)


def aux_term(term: AuxTerm, captured: jax.Array, target: jax.Array) -> jax.Array:
    """One auxiliary term's per-position loss [batch, seq] (its weight not applied)."""
    if isinstance(term, HiddenStateMSE):
        return _mean_squared_error(captured.astype(jnp.float32), target)
    return _row_kl(target, captured.astype(jnp.float32)).mean(axis=1)  # [batch, heads, seq] -> [batch, seq]


def _mean_squared_error(x: jax.Array, target: jax.Array) -> jax.Array:
    """mean over the last axis of (x - target)^2."""
    return jnp.square(x - target).mean(axis=-1)


def _row_kl(target: jax.Array, probs: jax.Array) -> jax.Array:
    """KL(target || probs) over the last axis of probability rows, 0 log 0 = 0: the LOG_FLOOR clamps keep
    the logarithms of zeros finite, and a zero target multiplies its term away."""
    log_p = jnp.log(jnp.maximum(probs, LOG_FLOOR))
    return (target * (jnp.log(jnp.maximum(target, LOG_FLOOR)) - log_p)).sum(axis=-1)


def hidden_transfer(student: jax.Array, teacher: jax.Array, metric: str,
                    projection: jax.Array | None = None) -> jax.Array:
    """Per-position loss [...] of hidden states [..., Ds] and [..., Dt] through the float32 projection
    [Dt, Ds] (None: the identity), in float32 (transfer.hidden_transfer has the formulas)."""
    h = student.astype(jnp.float32)
    if projection is not None:
        h = h @ projection.T  # [..., Dt]
    t = teacher.astype(jnp.float32)
    if metric == "mse":
        return _mean_squared_error(h, t)
    # max(|h| |t|, eps) taken as sqrt(max(|h|^2 |t|^2, eps^2)): the same value, and a zero vector's gradient
    # stays finite (the square root of a norm has an infinite derivative at 0).
    norms = jnp.sqrt(jnp.maximum(jnp.sum(h * h, axis=-1) * jnp.sum(t * t, axis=-1), COSINE_EPS**2))
    return 1.0 - jnp.sum(h * t, axis=-1) / norms


def _attention_rows(q: jax.Array, k: jax.Array, mask: jax.Array, scale: float, temperature: float) -> jax.Array:
    """softmax(masked q k^T * scale / temperature) over the keys, float32 [batch, heads, rows, keys], of
    queries [batch, heads, rows, d] and keys [batch, kv_heads, keys, d] (query head h reads kv head
    h // (heads / kv_heads), as in the model) under a boolean mask [batch or 1, 1, rows, keys]."""
    batch, heads, rows, d = q.shape
    kv_heads = k.shape[1]
    grouped = q.astype(jnp.float32).reshape(batch, kv_heads, heads // kv_heads, rows, d)
    scores = jnp.einsum("bkgqd,bksd->bkgqs", grouped, k.astype(jnp.float32)).reshape(batch, heads, rows, -1)
    return jax.nn.softmax(jnp.where(mask, scores * scale / temperature, -jnp.inf), axis=-1)


def _row_chunks(x: jax.Array, axis: int, chunk: int, fill: Any = 0) -> jax.Array:
    """x with its ``axis`` (the query rows) padded with ``fill`` to whole chunks and split: the chunks lead,
    [chunks, ..., chunk, ...]."""
    count = -(-x.shape[axis] // chunk)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, count * chunk - x.shape[axis])
    x = jnp.pad(x, widths, constant_values=fill)
    return jnp.moveaxis(x.reshape(*x.shape[:axis], count, chunk, *x.shape[axis + 1 :]), axis, 0)


def attention_transfer_sum(term: AttentionTransfer, student: tuple[Gemma3Config, QueriesKeys, jax.Array],
                           teacher: tuple[Gemma3Config, QueriesKeys, jax.Array], weights: jax.Array) -> jax.Array:
    """sum over (batch, query) of weights [batch, seq] * the attention transfer's per-row loss
    (transfer.attention_transfer has the definition), float32. ``student`` and ``teacher`` are each (config,
    the block's captured (q, k), its layer type's mask [batch or 1, 1, seq, seq]); the teacher's row is
    restricted to the keys the student's may see too, and takes no gradient.

    ``term.query_chunk`` query rows at a time, through ``lax.scan`` with a checkpointed body (as
    head_term_sums chunks the logits): a chunk's [batch, heads, chunk, seq] rows, the teacher's and the
    student's, exist one chunk at a time, in the backward pass too. The last chunk is padded with zero
    queries that see every key and weigh 0: finite rows, adding 0 (and 0 to the gradient)."""
    (s_config, (q_s, k_s), s_mask), (t_config, (q_t, k_t), t_mask) = student, teacher
    chunk = min(term.query_chunk, q_s.shape[2])
    s_groups, t_groups = (jnp.asarray(g) for g in attention_groups(term, s_config, t_config))  # [G, H]

    @partial(jax.checkpoint, prevent_cse=False)
    def chunk_sum(qs: jax.Array, qt: jax.Array, ms: jax.Array, mt: jax.Array, w: jax.Array) -> jax.Array:
        s_rows = _attention_rows(qs, k_s, ms, s_config.attention_scale, term.temperature)  # [b, Hs, chunk, seq]
        t_rows = _attention_rows(qt, k_t, mt & ms, t_config.attention_scale, term.temperature)
        s = jnp.einsum("gh,bhqk->bgqk", s_groups, s_rows)  # [b, G, chunk, seq]
        t = jax.lax.stop_gradient(jnp.einsum("gh,bhqk->bgqk", t_groups, t_rows))
        return jnp.sum(_row_kl(t, s).mean(axis=1) * w)

    def body(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        return total + chunk_sum(*xs), None

    xs = (_row_chunks(q_s, 2, chunk), _row_chunks(q_t, 2, chunk), _row_chunks(s_mask, 2, chunk, True),
          _row_chunks(t_mask, 2, chunk, True), _row_chunks(weights.astype(jnp.float32), 1, chunk))
    total, _ = jax.lax.scan(body, jnp.float32(0.0), xs)
    return total


@dataclass(frozen=True)
class CompanionHead:
    """A frozen companion model's side of the head loss, inside the jitted step (a closure of the chunk loop,
    not a pytree): its parameters (constants: never differentiated), its final-normed hidden states
    [n, its hidden] (computed under stop_gradient), its config, the number of ids it shares with the student
    and its sharding hint."""

    params: Params
    hidden: jax.Array
    config: Gemma3Config
    shared: int
    hint: Hint = no_hint

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [chunk, shared] of hidden states [chunk, its hidden]: the matmul in the companion's
        dtype accumulating in float32, then its own soft-cap in float32. The logits are restricted, not the
        matrix: a sliced [vocab, hidden] operand could be copied whole for every chunk."""
        logits = jnp.matmul(hidden, output_weight(self.params).T, preferred_element_type=jnp.float32)
        logits = self.hint(logits, ("batch", "vocab"))
        return jax.lax.stop_gradient(soft_cap(logits, self.config.final_logit_softcapping)[:, : self.shared])


@dataclass(frozen=True)
class CompanionCapture:
    """A frozen companion model's side of the transfer terms, inside the jitted step (a closure, like
    CompanionHead): its config, the hidden states the terms read {index: [batch, seq, its hidden]} and the
    queries and keys {block: (q, k)}, computed under stop_gradient, and its masks per layer type (None: the
    built-in causal ones)."""

    config: Gemma3Config
    hidden_states: dict[int, jax.Array]
    queries_keys: dict[int, QueriesKeys]
    masks: Masks | None


def transfer_term_sums(
    terms: tuple[TransferTerm, ...],
    config: Gemma3Config,
    out: Gemma3Output,
    masks: Masks | None,
    weights: jax.Array,
    captures: Mapping[str, CompanionCapture],
    loss_parameters: Mapping[str, jax.Array],
) -> list[jax.Array]:
    """Per transfer term, the sum over positions of weights [batch, seq] * its per-position loss (its weight
    not applied), float32: the student's captures ``out`` (its masks per layer type ``masks``, None: the
    built-in causal ones) against each companion's ``captures``, through the float32 ``loss_parameters``
    (the projections)."""
    seq = weights.shape[1]
    sums = []
    for term in terms:
        teacher = captures[term.teacher]
        if isinstance(term, HiddenStateTransfer):
            projection = None if term.projection is None else loss_parameters[term.projection]
            per_position = hidden_transfer(hidden_state(out, term.student_layer), teacher.hidden_states[term.teacher_layer],
                                           term.metric, projection)
            sums.append(jnp.sum(per_position * weights))
        else:
            t_config = teacher.config
            student = (config, out.queries_keys[term.student_layer],
                       _masks(config, masks, seq)[config.layer_types[term.student_layer]])
            teacher_side = (t_config, teacher.queries_keys[term.teacher_layer],
                            _masks(t_config, teacher.masks, seq)[t_config.layer_types[term.teacher_layer]])
            sums.append(attention_transfer_sum(term, student, teacher_side, weights))
    return sums


def _masks(config: Gemma3Config, masks: Masks | None, seq: int) -> Masks:
    """The masks per layer type given, else the built-in causal ones of positions 0 .. seq-1."""
    return masks if masks is not None else default_masks(config, jnp.arange(seq)[None])


def head_term_sums(
    params: Params,
    config: Gemma3Config,
    hidden: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    chunk_tokens: int,
    terms: tuple[HeadTerm, ...] = (CrossEntropy(),),
    extras: Mapping[str, jax.Array] | None = None,
    hint: Hint = no_hint,
    companions: Mapping[str, CompanionHead] | None = None,
    scalars: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
    """[terms]: per head term, the sum over positions of weights * its per-position loss (its weight not
    applied), float32, of final-normed hidden states [n, hidden] against int targets [n], with the output
    head (``model.logits_from_hidden``: tied or not, soft-capped or not) run on at most ``chunk_tokens``
    positions at a time; ``extras`` are the terms' per-position inputs [n, ...], ``companions`` the frozen
    teachers the Distillation terms read (their hidden states are chunked alongside, their heads run per
    chunk), ``scalars`` the step's traced scalars.

    The chunks go through ``lax.scan`` with a checkpointed body: the backward pass recomputes each
    chunk's [chunk, vocab] logits (the companions' too) from its hidden states instead of reading them from
    the forward pass, so [n, vocab] logits never exist (at Gemma's 262k vocabulary they would be 1 MB per
    position). The last chunk is padded with weight-0 positions: zero hidden states (and extras) give
    finite logits and losses, so they add 0.
    """
    n, dim = hidden.shape
    chunk = min(chunk_tokens, n)
    count = -(-n // chunk)
    pad = count * chunk - n
    companions = dict(companions or {})
    scalars = dict(scalars or {})

    def chunked(x: jax.Array) -> jax.Array:  # [n, ...] -> [chunks, chunk, ...], padded with zeros
        return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(count, chunk, *x.shape[1:])

    # float extras in float32; teacher ids stay int (their padding, id 0, has weight 0 like the rest)
    extras = {name: chunked(value if jnp.issubdtype(value.dtype, jnp.integer) else value.astype(jnp.float32))
              for name, value in (extras or {}).items()}
    teacher_hidden = {name: chunked(head.hidden) for name, head in companions.items()}

    # scan already keeps the chunks apart, so CSE cannot undo the recomputation (jax.checkpoint docs)
    @partial(jax.checkpoint, prevent_cse=False)
    def chunk_sums(h: jax.Array, t: jax.Array, w: jax.Array, ex: dict[str, jax.Array],
                   th: dict[str, jax.Array]) -> jax.Array:
        logits = logits_from_hidden(params, config, h, hint).astype(jnp.float32)  # [chunk, vocab]
        teachers = {name: companions[name].logits(value) for name, value in th.items()}  # [chunk, shared]
        return jnp.stack([jnp.sum(head_term(term, logits, t, ex, teachers, scalars) * w) for term in terms])

    def body(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        return total + chunk_sums(*xs), None

    xs = (chunked(hidden), chunked(targets), chunked(weights.astype(jnp.float32)), extras, teacher_hidden)
    sums, _ = jax.lax.scan(body, jnp.zeros(len(terms), jnp.float32), xs)
    return sums


def _weighted(terms: tuple[HeadTerm | AuxTerm, ...], sums: jax.Array) -> jax.Array:
    """sum of each term's weight times its sum: the loss sum."""
    return jnp.sum(jnp.asarray([term.weight for term in terms], jnp.float32) * sums)


def head_loss_sum(
    params: Params,
    config: Gemma3Config,
    hidden: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    chunk_tokens: int,
    terms: tuple[HeadTerm, ...] = (CrossEntropy(),),
    extras: Mapping[str, jax.Array] | None = None,
    hint: Hint = no_hint,
    companions: Mapping[str, CompanionHead] | None = None,
    scalars: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
    """sum over positions of weights * the head ``terms`` (each times its weight), float32: the weighted
    sum of ``head_term_sums`` (which see)."""
    sums = head_term_sums(params, config, hidden, targets, weights, chunk_tokens=chunk_tokens, terms=terms,
                          extras=extras, hint=hint, companions=companions, scalars=scalars)
    return _weighted(tuple(terms), sums)


def hidden_state(out: Gemma3Output, index: int) -> jax.Array:
    """Hidden state ``index`` in transformers' convention: the residual stream after ``index`` blocks, the
    last one after the final norm."""
    return out.last_hidden_state if index == len(out.hidden_states) - 1 else out.hidden_states[index]


def chunked_term_sums(
    params: Params,
    config: Gemma3Config,
    ids: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    rope: Rope,
    *,
    chunk_tokens: int,
    loss: LossSpec = LossSpec(),
    masks: Masks | None = None,
    extras: Mapping[str, jax.Array] | None = None,
    remat: bool = False,
    hint: Hint = no_hint,
    head_params: Params | None = None,
    companions: Mapping[str, CompanionHead] | None = None,
    scalars: Mapping[str, jax.Array] | None = None,
    captures: Mapping[str, CompanionCapture] | None = None,
    loss_parameters: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(the whole loss sum of ``loss``, the per-term sums [head terms + aux terms + transfer terms] with the
    terms' weights not applied): the backbone once on ids [batch, seq] (with ``masks``, else the built-in
    causal ones for positions 0 .. seq-1; capturing what the aux and transfer terms read), then
    ``head_term_sums`` over the flattened positions, then the aux terms, then the transfer terms
    (``transfer_term_sums``) against the companions' ``captures`` with the ``loss_parameters``. ``remat``
    rematerialises each decoder block; ``head_params`` (default ``params``) are the parameters the output
    head reads, in their dtype; ``companions`` and ``scalars`` are those of ``head_term_sums``."""
    extras = dict(extras or {})
    hidden_layers, attention_layers = loss.hidden_layers(), loss.attention_layers()
    out = text_model(  # masks None: the built-in ones of positions 0 .. seq-1, one for every row
        params, config, ids, mask=masks, rope=rope, hint=hint, remat=remat,
        output_hidden_states=bool(hidden_layers), output_attentions=frozenset(attention_layers),
        output_queries_keys=frozenset(loss.query_key_layers()),
    )
    head_params = params if head_params is None else head_params
    hidden = out.last_hidden_state.astype(output_weight(head_params).dtype)
    rows = ids.shape[0] * ids.shape[1]
    head_sums = head_term_sums(
        head_params,
        config,
        hidden.reshape(rows, hidden.shape[-1]),  # [batch * seq, hidden]
        targets.reshape(-1),
        weights.reshape(-1),
        chunk_tokens=chunk_tokens,
        terms=loss.head,
        extras={name: extras[name].reshape(rows, *extras[name].shape[2:]) for name in loss.head_extras},
        hint=hint,
        companions=companions,
        scalars=scalars,
    )
    captured_sums = []  # the aux terms', then the transfer terms'
    for term in loss.aux:
        captured = hidden_state(out, term.layer) if isinstance(term, HiddenStateMSE) else out.attentions[term.layer]
        captured_sums.append(jnp.sum(aux_term(term, captured, extras[term.targets]) * weights))
    captured_sums += transfer_term_sums(loss.transfer, config, out, masks, weights, captures or {}, loss_parameters or {})
    sums = jnp.concatenate([head_sums, jnp.stack(captured_sums)]) if captured_sums else head_sums
    return _weighted(loss.terms, sums), sums


def chunked_loss_sum(
    params: Params,
    config: Gemma3Config,
    ids: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    rope: Rope,
    *,
    chunk_tokens: int,
    loss: LossSpec = LossSpec(),
    masks: Masks | None = None,
    extras: Mapping[str, jax.Array] | None = None,
    remat: bool = False,
    hint: Hint = no_hint,
    head_params: Params | None = None,
    companions: Mapping[str, CompanionHead] | None = None,
    scalars: Mapping[str, jax.Array] | None = None,
    captures: Mapping[str, CompanionCapture] | None = None,
    loss_parameters: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
    """The whole loss sum of ``loss`` (``chunked_term_sums``'s first value, which see)."""
    total, _ = chunked_term_sums(
        params, config, ids, targets, weights, rope, chunk_tokens=chunk_tokens, loss=loss, masks=masks,
        extras=extras, remat=remat, hint=hint, head_params=head_params, companions=companions, scalars=scalars,
        captures=captures, loss_parameters=loss_parameters,
    )
    return total


# A companion as the jitted step sees it: (name, config, plan), static.
CompanionSpec = tuple[str, Gemma3Config, Plan]


def companion_passes(
    companion_params: Mapping[str, Params], specs: tuple[CompanionSpec, ...], batch: Batch, loss: LossSpec,
    student_vocab: int,
) -> tuple[dict[str, CompanionHead], dict[str, CompanionCapture]]:
    """(the head side of the companions the Distillation terms read, ``loss.head_companions``: their final
    hidden states flattened [batch * seq, its hidden]; the captures of the companions the transfer terms
    read): each companion's backbone once on the batch's ids, with its own RoPE tables and masks
    (batch.companions), in its own dtype, capturing the hidden states and queries and keys its transfer
    terms name, under stop_gradient (its parameters are a separate, never differentiated argument of the
    step anyway)."""
    heads, captures = {}, {}
    for name, config, plan in specs:
        rope, masks = batch.companions[name]
        hidden_layers, query_key_layers = loss.companion_hidden_layers(name), loss.companion_query_key_layers(name)
        out = jax.lax.stop_gradient(text_model(
            companion_params[name], config, batch.ids, mask=masks, rope=rope, hint=plan.hint,
            output_hidden_states=bool(hidden_layers), output_queries_keys=frozenset(query_key_layers),
        ))
        if name in loss.head_companions:
            hidden = out.last_hidden_state
            heads[name] = CompanionHead(companion_params[name], hidden.reshape(-1, hidden.shape[-1]), config,
                                        shared_vocab(student_vocab, config.vocab_size), plan.hint)
        if hidden_layers or query_key_layers:
            captures[name] = CompanionCapture(config, {i: hidden_state(out, i) for i in hidden_layers},
                                              {i: out.queries_keys[i] for i in query_key_layers}, masks)
    return heads, captures


def _loss_sum(
    params: Params,
    batch: Batch,
    *,
    config: Gemma3Config,
    plan: Plan,
    chunk_tokens: int,
    loss: LossSpec,
) -> jax.Array:
    return chunked_loss_sum(
        params, config, batch.ids, batch.targets, batch.weights, batch.rope,
        chunk_tokens=chunk_tokens, loss=loss, masks=batch.masks, extras=batch.extras, hint=plan.hint,
    )


def _accumulate(
    trainable: dict[str, jax.Array],
    frozen: dict[str, jax.Array],
    companion_params: dict[str, Params],
    accumulator: dict[str, jax.Array],
    batch: Batch,
    loss_scale: jax.Array,
    *,
    structure: jax.tree_util.PyTreeDef,
    config: Gemma3Config,
    plan: Plan,
    chunk_tokens: int,
    loss: LossSpec,
    compute: str,
    remat: bool,
    companions: tuple[CompanionSpec, ...] = (),
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(unscaled loss sum, per-term sums, accumulator + d(loss_scale * loss sum)/d(trainable)) for one
    micro-batch; ``structure`` is the parameter tree's (hashable, so static: a wrapped model compiles its
    own step). ``trainable`` and ``frozen`` hold the model's parameters and the loss parameters (the
    projections ``loss.projections`` names, float32, never cast) by name. ``companion_params`` are the
    frozen companions' parameters (in their own dtype: never cast, never differentiated), ``companions``
    their static (name, config, plan)."""
    heads, captures = companion_passes(companion_params, companions, batch, loss, config.vocab_size)

    def scaled_loss(trainable: dict[str, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        # The cast is inside the differentiated function: gradients flow back through it to float32.
        everything = {**trainable, **frozen}
        master = rebuild(structure, everything)  # wrappers (linears.py) kept; the loss parameters left out
        # floats only: a quantized linear's packed codes stay integers (its scales follow the compute dtype)
        params = jax.tree.map(lambda p: p.astype(DTYPES[compute]) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                              master)
        value, sums = chunked_term_sums(
            params,
            config,
            batch.ids,
            batch.targets,
            batch.weights,
            batch.rope,
            chunk_tokens=chunk_tokens,
            loss=loss,
            masks=batch.masks,
            extras=batch.extras,
            remat=remat,
            hint=plan.hint,
            # fp16: the head and its gradient matmuls in float32 on the masters, as the fp16 policy keeps
            # the residual stream: the logit gradients (~1/vocab times the loss scale: 6e-5 at 262k ids and a
            # scale of 16) would be float16 subnormals, rounded to a few bits.
            head_params=master if compute == "float16" else None,
            companions=heads,
            scalars=batch.scalars,
            captures=captures,
            loss_parameters={name: everything[name] for name in loss.projections},
        )
        return value * loss_scale, (value, sums)

    (_, (value, sums)), grads = jax.value_and_grad(scaled_loss, has_aux=True)(trainable)
    return value, sums, jax.tree.map(jnp.add, accumulator, grads)


def _apply(
    params: dict[str, jax.Array],
    states: dict[str, Any],
    accumulator: dict[str, jax.Array],
    scales: dict[str, jax.Array],
    lr: jax.Array,
    normalizer: jax.Array,
    *,
    optimizer: OptimizerSpec,
    max_grad_norm: float | None,
) -> tuple[dict[str, jax.Array], dict[str, Any], dict[str, jax.Array], jax.Array]:
    """(parameters, states, zeroed accumulator, global norm before clipping) after one step; parameters
    and states come back unchanged when the norm is not finite."""
    grads = {name: g / normalizer for name, g in accumulator.items()}
    norm = optax.tree.norm(grads)
    if max_grad_norm is not None:  # spec.py's factor, not optax.clip_by_global_norm's (module docstring)
        factor = jnp.minimum(1.0, max_grad_norm / (norm + 1e-6))
        grads = {name: g * factor for name, g in grads.items()}
    transform = optimizer_transform(optimizer)
    # AdamW's decay is inside optax.adamw; Adafactor's is applied here (module docstring).
    decay = optimizer.weight_decay if optimizer.name == "adafactor" else 0.0

    def update(
        operands: tuple[dict[str, jax.Array], dict[str, Any]],
    ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
        params, states = operands
        new_params, new_states = {}, {}
        for name, p in params.items():
            u, new_states[name] = transform.update(grads[name], states[name], p)
            step = lr * scales[name]
            new_params[name] = p * (1 - step * decay) + step * u
        return new_params, new_states

    params, states = jax.lax.cond(jnp.isfinite(norm), update, lambda operands: operands, (params, states))
    return params, states, jax.tree.map(jnp.zeros_like, accumulator), norm


# Module-level, with everything that shapes the computation static: trainers of the same config and spec
# share compiled functions (the cache key also holds the trainable names, as the keys of their dicts).
_jit_loss_sum = jax.jit(_loss_sum, static_argnames=("config", "plan", "chunk_tokens", "loss"))
_jit_accumulate = jax.jit(
    _accumulate,
    static_argnames=("structure", "config", "plan", "chunk_tokens", "loss", "compute", "remat", "companions"),
    donate_argnames=("accumulator",),
)
_jit_apply = jax.jit(
    _apply,
    static_argnames=("optimizer", "max_grad_norm"),
    donate_argnames=("params", "states", "accumulator"),
)


def optimizer_transform(opt: OptimizerSpec) -> optax.GradientTransformation:
    """The optax transformation of one parameter at learning rate 1 (the step scales it by the parameter's
    learning rate); for Adafactor without the weight decay (see the module docstring)."""
    if opt.name == "adamw":
        b1, b2 = opt.betas
        return optax.named_chain(
            (
                "adamw",
                optax.adamw(1.0, b1=b1, b2=b2, eps=opt.eps, eps_root=0.0, weight_decay=opt.weight_decay),
            )
        )
    eps1, eps2 = opt.eps_adafactor
    direction = optax.adafactor(
        learning_rate=None,
        min_dim_size_to_factor=1,
        decay_rate=opt.decay_rate,
        multiply_by_parameter_scale=False,
        clipping_threshold=opt.clip_threshold,
        momentum=None,
        weight_decay_rate=None,
        eps=eps1,
    )  # -u: the clipped g / sqrt(V)
    momentum = [("momentum", optax.ema(opt.beta1, debias=False))] if opt.beta1 is not None else []
    return optax.named_chain(
        ("adafactor", direction), *momentum, ("parameter_scale", optax.scale_by_param_block_rms(eps2))
    )


# --- numpy in ------------------------------------------------------------------------------------------------
class Batch(NamedTuple):
    """A checked micro-batch (gemmalab.train.inputs.StepInputs) placed like the model's activations (a
    pytree, so the jitted steps take it whole)."""

    ids: jax.Array  # int32 [batch, seq]
    targets: jax.Array  # int32 [batch, seq]
    weights: jax.Array  # float32 [batch, seq]
    rope: Rope  # RoPE tables of the batch's positions
    masks: Masks | None  # layer type -> bool [batch, 1, seq, seq]; None = the built-in causal masks
    extras: dict[str, jax.Array]  # float32; int32 for teacher ids
    scalars: dict[str, jax.Array]  # float32 0-d: traced, so a new value (a scheduled temperature) never recompiles
    companions: dict[str, tuple[Rope, Masks | None]]  # each companion's RoPE tables and masks (its own config's)


def batch_arrays(model: JaxModel, step: StepInputs, rope: Rope | None = None,
                 companions: Mapping[str, tuple[JaxModel, Rope | None]] | None = None) -> Batch:
    """The batch on the model's mesh; ``rope`` (the tables of positions 0 .. seq-1, which a trainer
    caches) is used when the batch has no explicit positions. ``companions`` maps a companion's name to
    (its model, its cached tables of positions 0 .. seq-1 or None)."""

    def put(array: np.ndarray) -> jax.Array:
        return jax.device_put(array, model.plan.batch_sharding(array.shape))

    def put_masks(per_type: dict[str, np.ndarray]) -> Masks:
        return {kind: put(m[:, None]) for kind, m in per_type.items()}

    def tables(owner: JaxModel, cached: Rope | None) -> Rope:
        if step.positions is not None:
            return owner.rope(step.positions)
        return cached if cached is not None else owner.rope(_positions(step.inputs.shape[1]))

    masks = None if step.masks is None else put_masks(step.masks)
    companion_inputs = {}
    for name, (companion, cached) in (companions or {}).items():
        per_type = None if step.companion_masks is None else step.companion_masks[name]
        # the student's placed masks when prepare shared them
        placed = None if per_type is None else masks if per_type is step.masks else put_masks(per_type)
        companion_inputs[name] = (tables(companion, cached), placed)
    return Batch(
        ids=put(step.inputs), targets=put(step.targets), weights=put(step.weights), rope=tables(model, rope),
        masks=masks, extras={name: put(value) for name, value in step.extras.items()},
        scalars={name: jnp.float32(value) for name, value in step.scalars.items()}, companions=companion_inputs,
    )


def _matmul_precision(dtype: str) -> contextlib.AbstractContextManager:
    """Full fp32 matmuls when computing in float32 (on TPU the default rounds their inputs to bf16), as
    backend.JaxModel traces its inference functions."""
    return jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()


def _positions(seq: int) -> np.ndarray:
    return np.arange(seq)[None]  # [1, seq]: one set of RoPE tables for every row


def loss_sum(
    model: JaxModel,
    inputs: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    *,
    chunk_tokens: int,
    label_smoothing: float,
) -> float:
    """sum(weights * token loss) in the model's own dtype, no gradients (Backend.loss_sum)."""
    _check_chunk(chunk_tokens)
    loss = LossSpec(head=(CrossEntropy(label_smoothing=float(label_smoothing)),))
    batch = batch_arrays(model, prepare(model.config, loss, inputs, targets, weights))
    with _matmul_precision(model.dtype):
        total = _jit_loss_sum(
            model.params, batch, config=model.config, plan=model.plan, chunk_tokens=int(chunk_tokens), loss=loss
        )
    return float(total)


def _check_chunk(chunk_tokens: int) -> None:
    if not is_count(chunk_tokens) or chunk_tokens < 1:
        raise InputError(f"chunk_tokens must be a positive number of positions, got {chunk_tokens!r}")


# --- the trainer --------------------------------------------------------------------------------------------
def frozen_companions(model: JaxModel, loss: LossSpec, companions: Mapping[str, JaxModel] | None) -> dict[str, JaxModel]:
    """The companion models the loss reads (checked by spec.check_companions). They are frozen by
    construction: their parameters enter the jitted step as an argument that is never differentiated, and no
    update ever touches them."""
    from .backend import JaxModel  # the backend module imports this one

    companions = dict(companions or {})
    for name, companion in companions.items():
        if not isinstance(companion, JaxModel):
            raise InputError(f"companion {name!r} is a {type(companion).__name__}, not a model of this backend: "
                             "build it with the same backend's build(...)")
        if companion is model:
            raise InputError(f"companion {name!r} is the model being trained: a companion is frozen, so build a "
                             "separate copy (backend.build(config, backend.weights(model), dtype=...))")
        if companion.shape_only:
            raise InputError(f"companion {name!r} was built shape-only (weights=None): build it with weights")
    check_companions(loss, model.config, {name: c.config for name, c in companions.items()})
    return companions


def placed_loss_parameters(model: JaxModel, loss: LossSpec, companions: Mapping[str, JaxModel],
                           given: Mapping[str, np.ndarray] | None) -> dict[str, jax.Array]:
    """The loss parameters a trainer starts from (transfer.checked_loss_parameters: ``given``, checked, or
    fresh from seed 0; a name clashing with a model parameter is refused there), float32, replicated on the
    model's mesh."""
    values = checked_loss_parameters(loss, model.config, {name: c.config for name, c in companions.items()}, given)
    return {name: jax.device_put(value, model.plan.replicated()) for name, value in values.items()}


class Trainer:
    """gemmalab.train.spec.BackendTrainer for a float32 ``JaxModel``; ``trainer.model.params`` holds the
    current weights after every step (new arrays: the old ones are donated to the update). ``companions``
    (name -> a JaxModel of any dtype) are the frozen models the loss's Distillation and transfer terms read.

    The loss parameters (the projections of the transfer terms, gemmalab.train.transfer) start from
    ``loss_parameters`` (None: fresh ones from seed 0) and train beside the model's under their own names:
    in the gradients, the clipping norm, the optimizer step and its state, the learning-rate scales; never
    in the model (``loss_parameters()`` reads them)."""

    def __init__(self, model: JaxModel, spec: TrainSpec, companions: Mapping[str, JaxModel] | None = None,
                 loss_parameters: Mapping[str, np.ndarray] | None = None):
        if model.shape_only:
            raise BackendError(
                "this model was built shape-only (weights=None): build it with weights to train"
            )
        if model.dtype != "float32":
            raise InputError(
                f"training needs the model in float32 (master weights), got {model.dtype}: "
                "build it with dtype='float32' and choose the compute precision in the spec"
            )
        dropping = [name for name, leaf in wrappers(model).items() if getattr(leaf, "dropout", 0.0)]
        if dropping:  # the jitted step takes no random key yet, and a silent no-dropout run would mislead
            raise InputError(f"adapter dropout is not implemented on the JAX backend ({dropping[0]} has "
                             f"{wrappers(model)[dropping[0]].dropout:g}): train with dropout=0 here, or on torch or mlx")
        self.model, self.spec = model, spec
        self.companions = frozen_companions(model, spec.loss, companions)
        self._loss_parameters = placed_loss_parameters(model, spec.loss, self.companions, loss_parameters)
        self.term_names = spec.loss.term_names()
        self._term_sums: jax.Array | None = None  # of the last accumulate
        self.compute = COMPUTE_DTYPES[spec.precision]
        self.transform = optimizer_transform(spec.optimizer)
        # canonical (the tied head once), then the loss parameters
        self.names = [*flatten(model.params), *self._loss_parameters]
        self.scales: dict[str, float] = {}
        self.states: dict[str, Any] = {}  # optax state per parameter, made at its first update
        self.accumulator: dict[str, jax.Array] = {}  # float32, one entry per trainable parameter
        self._scale_arrays: dict[str, jax.Array] = {}
        self._rope: dict[tuple[str | None, int], Rope] = {}  # RoPE tables per (companion or None, seq length)
        self.set_lr_scales({})

    def accumulate(
        self,
        inputs: np.ndarray,
        targets: np.ndarray,
        weights: np.ndarray,
        *,
        positions: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        extras: Mapping[str, np.ndarray] | None = None,
        scalars: Mapping[str, float] | None = None,
        loss_scale: float = 1.0,
    ) -> float:
        """Forward and backward on one micro-batch; adds d(loss_scale * loss_sum)/d(params) to the
        accumulated gradients of the trainable parameters. Returns the unscaled loss sum. The scalars are
        traced arguments of the compiled step: a new temperature every step compiles nothing."""
        step = prepare(self.model.config, self.spec.loss, inputs, targets, weights, positions=positions,
                       mask=mask, extras=extras, scalars=scalars,
                       companions={name: c.config for name, c in self.companions.items()})
        batch = batch_arrays(
            self.model, step, self._cached_rope(None, self.model, step),
            {name: (c, self._cached_rope(name, c, step)) for name, c in self.companions.items()},
        )
        flat = self._parameters()
        trainable = {name: flat[name] for name in self.accumulator}
        frozen = {name: value for name, value in flat.items() if name not in self.accumulator}
        with _matmul_precision(self.compute):
            loss, self._term_sums, self.accumulator = _jit_accumulate(
                trainable,
                frozen,
                {name: c.params for name, c in self.companions.items()},
                self.accumulator,
                batch,
                jnp.float32(loss_scale),
                structure=jax.tree_util.tree_structure(self.model.params),
                config=self.model.config,
                plan=self.model.plan,
                chunk_tokens=self.spec.loss_chunk_tokens,
                loss=self.spec.loss,
                compute=self.compute,
                remat=self.spec.grad_checkpointing,
                companions=tuple((name, c.config, c.plan) for name, c in self.companions.items()),
            )
        return float(loss)

    def _cached_rope(self, name: str | None, owner: JaxModel, step: StepInputs) -> Rope | None:
        """The RoPE tables of positions 0 .. seq-1 for the student (name None) or a companion, made once per
        sequence length; None for a batch with explicit positions (batch_arrays makes those)."""
        if step.positions is not None:
            return None
        key = (name, step.inputs.shape[1])
        if key not in self._rope:
            self._rope[key] = owner.rope(_positions(key[1]))
        return self._rope[key]

    def _parameters(self) -> dict[str, jax.Array]:
        """Every parameter the optimizer may update, by name: the model's (canonical) and the loss's."""
        return {**flatten(self.model.params), **self._loss_parameters}

    def loss_parameters(self) -> dict[str, np.ndarray]:
        """The current loss parameters (the projections), float32 numpy copies: what a resumed trainer
        starts from (``loss_parameters=``)."""
        return {name: np.array(value, np.float32) for name, value in self._loss_parameters.items()}

    def term_sums(self) -> dict[str, float]:
        if self._term_sums is None:
            return {}
        return dict(zip(self.term_names, np.asarray(self._term_sums, np.float64).tolist(), strict=True))

    def gradients(self) -> dict[str, np.ndarray]:
        """The accumulated gradients of the trainable parameters, float32 numpy, canonical names (and the
        loss parameters' under theirs)."""
        return {name: np.array(grad) for name, grad in self.accumulator.items()}

    def apply(self, lr: float, normalizer: float) -> dict[str, float]:
        """Normalise, clip and take one optimizer step (see gemmalab.train.spec.BackendTrainer.apply)."""
        if not self.accumulator:
            return {"grad_norm": 0.0}
        flat = self._parameters()
        params = {name: flat[name] for name in self.accumulator}
        for name, value in params.items():
            if name not in self.states:  # the parameter's first update: fresh state, t = 0
                self.states[name] = self._placed(self.transform.init(value), value)
        params, states, self.accumulator, norm = _jit_apply(
            params,
            {name: self.states[name] for name in params},
            self.accumulator,
            self._scale_arrays,
            jnp.float32(lr),
            jnp.float32(normalizer),
            optimizer=self.spec.optimizer,
            max_grad_norm=self.spec.max_grad_norm,
        )
        self.states.update(states)
        self.model.params = rebuild(self.model.params, {**flat, **params})  # the loss parameters left out
        self._loss_parameters = {name: params.get(name, value) for name, value in self._loss_parameters.items()}
        return {"grad_norm": float(norm)}

    def _placed(self, state: Any, param: jax.Array) -> Any:
        """A state's leaves placed on the model's mesh as the update step returns them (moments like the
        parameter, the rest replicated): otherwise the step's second call would not match its first
        compilation and would compile again."""
        replicated = self.model.plan.replicated()
        return jax.tree.map(
            lambda leaf: jax.device_put(leaf, param.sharding if leaf.shape == param.shape else replicated),
            state,
        )

    def set_lr_scales(self, scales: Mapping[str, float]) -> None:
        """Per-parameter learning-rate multipliers by canonical name (missing = 1.0); 0 freezes: the
        parameter leaves the accumulator (and what it held) and the optimizer step."""
        unknown = sorted(set(scales) - set(self.names))
        if unknown:
            raise InputError(f"learning-rate scales name parameters this model does not have: {unknown[:3]}")
        bad = {name: s for name, s in scales.items() if not (math.isfinite(s) and s >= 0)}
        if bad:
            raise InputError(f"learning-rate scales must be finite and >= 0, got {bad}")
        self.scales = {name: float(scales.get(name, 1.0)) for name in self.names}
        flat = self._parameters()
        trainable = [name for name in self.names if self.scales[name] != 0.0]
        self.accumulator = {
            name: self.accumulator[name] if name in self.accumulator else jnp.zeros_like(flat[name])
            for name in trainable
        }
        self._scale_arrays = {name: jnp.float32(self.scales[name]) for name in trainable}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The canonical state of gemmalab/train/spec.py, translated from optax's (``optax_state_names``).
        A parameter whose state was made for an update that did not happen (its gradients were not finite)
        has no entry, as on the other backends: a state at step 0 is a fresh one."""
        flat = self._parameters()
        out = {}
        for name, state in self.states.items():
            leaves = {_key(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
            canonical = _canonical_state(leaves, self._optax_names(name, flat[name].shape, leaves))
            if canonical["step"][0] > 0:
                out |= {f"{kind}/{name}": value for kind, value in canonical.items()}
        return out

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a canonical state, written by any backend (checked by spec.check_optimizer_state)."""
        flat = self._parameters()
        shapes = {name: tuple(value.shape) for name, value in flat.items()}
        states = {}
        for name, values in check_optimizer_state(state, self.spec.optimizer, shapes).items():
            template = jax.eval_shape(self.transform.init, flat[name])  # shapes and dtypes, nothing allocated
            paths, treedef = jax.tree_util.tree_flatten_with_path(template)
            expected = {_key(path): leaf for path, leaf in paths}
            names = self._optax_names(name, flat[name].shape, expected)
            leaves = [_optax_leaf(values, names[path], path, leaf) for path, leaf in expected.items()]
            states[name] = self._placed(jax.tree_util.tree_unflatten(treedef, leaves), flat[name])
        self.states = states

    def _optax_names(self, name: str, shape: tuple[int, ...], leaves: Mapping[str, Any]) -> dict[str, str | None]:
        """optax_state_names for parameter ``name``, checked against the leaves optax keeps: an optax that
        keeps more would otherwise lose them in the translation."""
        names = optax_state_names(self.spec.optimizer, shape)
        if names.keys() != leaves.keys():
            raise BackendError(
                f"optax keeps the state of {name} as {sorted(leaves)}, not the {sorted(names)} gemmalab_jax "
                f"translates to spec.py's names: this optax {optax.__version__} is not supported"
            )
        return names


def _key(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


# optax's Adafactor direction is -u, so the momentum chained after it (optax.ema) averages -u: spec.py's m is
# its negation (exact, both ways).
NEGATED = "momentum.ema"


def optax_state_names(opt: OptimizerSpec, shape: tuple[int, ...]) -> dict[str, str | None]:
    """The path of each leaf of optimizer_transform(opt)'s state for a parameter of ``shape`` -> the state of
    gemmalab/train/spec.py it holds (None: a [1] zeros placeholder optax keeps for the branch it does not
    use). Two leaves may hold ``step``: Adafactor's count and the momentum's, equal by construction."""
    if opt.name == "adamw":
        return {"adamw.0.count": "step", "adamw.0.mu": "exp_avg", "adamw.0.nu": "exp_avg_sq"}
    names = {"adafactor.0.count": "step", "adafactor.0.v": None, "adafactor.0.v_row": None, "adafactor.0.v_col": None}
    if len(shape) >= 2:
        row, col = _optax_row_col(shape)
        names |= {f"adafactor.0.{row}": "exp_avg_sq_row", f"adafactor.0.{col}": "exp_avg_sq_col"}
    else:
        names["adafactor.0.v"] = "exp_avg_sq"
    if opt.beta1 is not None:
        names |= {"momentum.count": "step", NEGATED: "exp_avg"}
    return names


def _optax_row_col(shape: tuple[int, ...]) -> tuple[str, str]:
    """(optax's name of spec.py's R, of its C) for a factored parameter of ``shape``.

    optax factors the two largest axes, found as ``np.argsort(shape)[-2:]`` = (d1, d0) (optax/_src/
    factorized.py, ``_factored_dims``; the same call here gives the same order on ties), and keeps ``v_row``
    as the mean over d0 and ``v_col`` as the mean over d1. spec.py's R is the mean over the last axis: for a
    matrix with at least as many columns as rows that is v_row, for one with more rows than columns v_col.
    """
    d1, d0 = (int(axis) for axis in np.argsort(shape)[-2:])
    last = len(shape) - 1
    if {d0, d1} != {last - 1, last}:
        raise BackendError(
            f"optax factors axes {d1} and {d0} of a parameter of shape {list(shape)}, spec.py's Adafactor the last "
            "two: train this model with --optimizer adamw on JAX, or on torch or MLX"
        )
    return ("v_row", "v_col") if d0 == last else ("v_col", "v_row")


def _canonical_state(leaves: Mapping[str, np.ndarray], names: Mapping[str, str | None]) -> dict[str, np.ndarray]:
    """One parameter's optax leaves (path -> numpy) in spec.py's names: float32 moments, int64 [1] step."""
    out = {}
    for path, kind in names.items():
        if kind is None or kind in out:  # a placeholder, or the momentum's copy of the step
            continue
        value = leaves[path]
        if kind == "step":
            out[kind] = np.array([int(value)], np.int64)  # optax counts in int32, 0-d
        else:
            out[kind] = -value if path == NEGATED else np.array(value)
    return out


def _optax_leaf(values: Mapping[str, np.ndarray], kind: str | None, path: str, leaf: Any) -> np.ndarray:
    """The optax leaf at ``path`` (shape and dtype of ``leaf``) from a parameter's canonical state."""
    if kind is None:
        return np.zeros(leaf.shape, leaf.dtype)
    value = values[kind]
    if path == NEGATED:
        value = -value
    return value.astype(leaf.dtype).reshape(leaf.shape)  # the step: int64 [1] -> optax's 0-d int32


__all__ = [
    "Batch",
    "CompanionCapture",
    "CompanionHead",
    "Trainer",
    "attention_transfer_sum",
    "aux_term",
    "batch_arrays",
    "cached_distillation",
    "chunked_loss_sum",
    "chunked_term_sums",
    "companion_passes",
    "divergence",
    "frozen_companions",
    "head_loss_sum",
    "head_term",
    "head_term_sums",
    "hidden_state",
    "hidden_transfer",
    "loss_sum",
    "optimizer_transform",
    "placed_loss_parameters",
    "transfer_term_sums",
]
