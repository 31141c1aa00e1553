"""Training on MLX: the chunked loss, gradient accumulation, clipping and the optimizer step behind
gemmalab.train.spec.BackendTrainer. The formulas are in gemmalab/train/spec.py.

The loss and its gradients come from one ``mlx.nn.value_and_grad`` over the trainable parameters, with the
output head and loss inside as one custom function (``fused_head_loss``) whose forward pass works chunk by
chunk and computes each chunk's gradients (hidden states, head weight) on the spot, evaluated before the next
chunk is built: one chunk's logits exist at a time, none is recomputed, and the backbone runs forward once.
A parameter with learning-rate scale 0 is frozen (``Module.freeze``), so no gradient is computed for it.
Each parameter has its own optimizer
instance: spec.py counts the step ``t`` per parameter (a block unfrozen at step 1000 starts at t = 1) and
every parameter can have its own learning rate (layer-wise decay), while an MLX optimizer keeps one step
count and one learning rate for everything it updates.

AdamW is ``mlx.optimizers.AdamW`` with ``bias_correction=True`` (MLX's default is False), which then
computes spec.py's formula as it stands: decay ``p * (1 - lr * wd)`` first, then ``lr * m_hat / (sqrt(v_hat)
+ eps)`` (MLX writes it as ``lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``).

Adafactor is ``mlx.optimizers.Adafactor`` for the direction of the step and this file for its size. MLX
multiplies the clipped update by ``lr * max(eps2, rms(p))`` *before* its first moment (so with ``beta1``
the moment averages differently scaled updates as the lr and rms(p) change), and decays weights by that
scaled rate; spec.py keeps the moment of the unscaled update and decays by ``lr`` alone. So MLX runs with
``learning_rate=1``, ``scale_parameter=False``, ``relative_step=False`` (its default True ignores the lr),
``weight_decay=0`` and ``decay_rate=-decay_rate`` (MLX's beta2 is ``1 - t^decay_rate``, spec.py's is
``1 - t^-decay_rate``): that computes the factored second moments (over the last two axes, for every
parameter with >= 2 dims, as spec.py), the update clipping and the first moment exactly, and this file
applies ``p * (1 - lr * wd) - lr * max(eps2, rms(p)) * u``.

Companion models (frozen teachers, ``Trainer(..., companions=)``) are frozen modules outside the student's
``value_and_grad``: their backbone runs first, in their own dtype, and is evaluated, returning what the loss
reads of it (``companion_passes``): for the Distillation terms' companions (``LossSpec.head_companions``) the
final-normed hidden states, whose output head then runs per chunk inside ``fused_head_loss`` beside the
student's, as a constant of the chunk's gradient; for the transfer terms the hidden states and the queries
and keys of the blocks they name.

The transfer terms (gemmalab/train/transfer.py has their definitions) follow the head and aux terms. A
hidden-state transfer is a per-position function of two captured hidden states (through a projection).
An attention transfer rebuilds both models' attention rows of the mapped blocks from their captured queries
and keys, ``query_chunk`` query rows at a time (``attention_transfer_sum``): like ``fused_head_loss`` it
computes each chunk's gradient (queries, keys) in the forward pass and evaluates it before the next chunk is
built, so one chunk's [batch, heads, rows, keys] scores exist at a time, and none is kept or recomputed for
the backward pass. The projections the hidden-state terms name are the trainer's *loss parameters*: float32
arrays outside the model (never in ``Backend.weights``), differentiated in the same ``mx.value_and_grad`` as
the model's trainable parameters and updated by the same optimizer formulas under their own names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from gemmalab.config import Gemma3Config
from gemmalab.errors import InputError
from gemmalab.train import transfer
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
    shared_vocab,
)
from gemmalab.train.spec import TrainSpec, check_companions, check_optimizer_state

from .linears import Wrapper
from .model import Gemma3ForCausalLM, Gemma3Output, gqa_scores, soft_cap

COMPUTE_DTYPES = {"fp32": None, "bf16": mx.bfloat16, "fp16": mx.float16}


# --- the loss terms (gemmalab/train/losses.py has their definitions) --------------------------------------------
def cross_entropy(logits: mx.array, targets: mx.array, label_smoothing: float) -> mx.array:
    """Per-position cross-entropy [n] of float32 logits [n, vocab]: -log p(target), mixed with the mean of
    -log p over the vocabulary by ``label_smoothing``."""
    lse = mx.logsumexp(logits, axis=-1)  # [n]
    nll = lse - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]  # -log p(target), [n]
    if label_smoothing:
        # mean_v -log p(v) = lse - mean_v logits
        nll = (1 - label_smoothing) * nll + label_smoothing * (lse - logits.mean(axis=-1))
    return nll


def soft_target_cross_entropy(logits: mx.array, probs: mx.array, temperature: float) -> mx.array:
    """Per-position ``T^2 * -sum_v q_v log softmax(z / T)_v`` [n]."""
    z = logits / temperature
    log_p = z - mx.logsumexp(z, axis=-1, keepdims=True)
    return temperature**2 * -(probs * log_p).sum(axis=-1)


def _log_softmax(z: mx.array) -> mx.array:
    return z - mx.logsumexp(z, axis=-1, keepdims=True)


def _kl(log_p: mx.array, log_q: mx.array) -> mx.array:
    return (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def divergence(student: mx.array, teacher: mx.array, term: Distillation, temperature: float) -> mx.array:
    """Per-position divergence [n] of float32 logits [n, shared] (losses.divergence has the formulas)."""
    log_s, log_t = _log_softmax(student / temperature), _log_softmax(teacher / temperature)
    kind, beta = term.divergence, term.beta
    if kind == "fkl" or (kind == "jsd" and beta == 0):
        per_position = _kl(log_t, log_s)
    elif kind == "rkl" or (kind == "jsd" and beta == 1):
        per_position = _kl(log_s, log_t)
    elif kind == "jsd":
        log_m = mx.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))  # the mixture
        per_position = beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
    else:
        per_position = 0.5 * mx.abs(mx.exp(log_t) - mx.exp(log_s)).sum(axis=-1)
    return temperature**2 * per_position if term.t2_scaling else per_position


def cached_distillation(logits: mx.array, term: CachedDistillation, ids: mx.array, logprobs: mx.array,
                        tail: mx.array | None) -> mx.array:
    """Per-position loss [n] of float32 logits [n, vocab] against cached teacher targets: ids int32 [n, k],
    their log-probabilities [n, k] and, for top-k, the tail mass [n] (losses.cached_distillation has the
    formulas). log q_rest is a log-sum-exp over the ids not kept (the kept ones masked to -inf), not
    log(1 - sum q_kept): that difference loses q_rest to cancellation in float32 once the kept ids hold
    nearly all the mass, which is when its gradient matters most."""
    z = logits / term.temperature
    lse = mx.logsumexp(z, axis=-1)  # [n]
    log_q = mx.take_along_axis(z, ids, axis=-1) - lse[:, None]  # [n, k]
    if term.estimator == "sampled":
        per_position = -log_q.mean(axis=-1)
    else:
        kept = mx.put_along_axis(mx.zeros(z.shape, dtype=mx.bool_), ids, mx.array(True), axis=-1)  # [n, vocab]
        # A row whose kept ids cover the vocabulary (k = vocabulary) has no rest bucket: its rest term is 0.
        # Its mask is lifted, so no log-sum-exp runs over -inf alone: MLX's where passes a gradient on as
        # cotangent * condition, so a NaN from the masked entries would reach the logits.
        has_rest = mx.logical_not(kept.all(axis=-1))  # [n]
        masked = mx.where(mx.logical_and(kept, has_rest[:, None]), -mx.inf, z)
        log_q_rest = mx.logsumexp(masked, axis=-1) - lse  # [n]
        rest = tail * (mx.log(mx.maximum(tail, LOG_FLOOR)) - log_q_rest)  # 0 log 0 = 0 at r = 0
        per_position = (mx.exp(logprobs) * (logprobs - log_q)).sum(axis=-1) + mx.where(has_rest, rest, 0.0)
    return term.temperature**2 * per_position if term.t2_scaling else per_position


def head_term(term: HeadTerm, logits: mx.array, targets: mx.array, extras: Mapping[str, mx.array],
              companions: Mapping[str, mx.array] | None = None, scalars: Mapping[str, float] | None = None) -> mx.array:
    """One head term's per-position loss [chunk] (its weight not applied); ``companions`` holds each
    companion's float32 logits of the chunk over the shared ids [chunk, shared]."""
    if isinstance(term, CrossEntropy):
        return cross_entropy(logits, targets, term.label_smoothing)
    if isinstance(term, Distillation):
        teacher = companions[term.teacher]
        return divergence(logits[:, : teacher.shape[-1]], teacher, term, term.temperature_at(scalars))
    if isinstance(term, CachedDistillation):
        tail = extras[term.tail] if term.estimator == "top-k" else None
        return cached_distillation(logits, term, extras[term.ids], extras[term.logprobs], tail)
    return soft_target_cross_entropy(logits, extras[term.targets], term.temperature)


def hidden_mse(hidden: mx.array, target: mx.array) -> mx.array:
    """Per-position mean over features of (hidden - target)^2 [...], in float32."""
    return (hidden.astype(mx.float32) - target).square().mean(axis=-1)


def attention_kl(probs: mx.array, target: mx.array) -> mx.array:
    """Per (batch, query) mean over heads (or head groups) of KL(target || probs) [batch, queries], of
    [batch, heads, queries, keys] rows; 0 log 0 = 0 through the LOG_FLOOR clamps."""
    log_p = mx.log(mx.maximum(probs.astype(mx.float32), LOG_FLOOR))
    return (target * (mx.log(mx.maximum(target, LOG_FLOOR)) - log_p)).sum(axis=-1).mean(axis=1)


def aux_term(term: AuxTerm, captured: mx.array, target: mx.array) -> mx.array:
    """One auxiliary term's per-position loss [batch, seq] (its weight not applied)."""
    if isinstance(term, HiddenStateMSE):
        return hidden_mse(captured, target)
    return attention_kl(captured, target)


def chunk_term_sums(
    logits: mx.array, targets: mx.array, weights: mx.array, terms: tuple[HeadTerm, ...], extras: Mapping[str, mx.array],
    companions: Mapping[str, mx.array] | None = None, scalars: Mapping[str, float] | None = None,
) -> mx.array:
    """[terms]: per head term, the sum over the chunk of weights * its per-position loss (its weight not
    applied), of float32 logits [n, vocab]; ``companions`` are the companions' logits of the chunk."""
    return mx.stack([(head_term(term, logits, targets, extras, companions, scalars) * weights).sum() for term in terms])


def chunk_loss(
    logits: mx.array, targets: mx.array, weights: mx.array, terms: tuple[HeadTerm, ...], extras: Mapping[str, mx.array],
    companions: Mapping[str, mx.array] | None = None, scalars: Mapping[str, float] | None = None,
) -> mx.array:
    """sum over the chunk of weights * the head terms, each times its weight, of float32 logits [n, vocab]."""
    sums = chunk_term_sums(logits, targets, weights, terms, extras, companions, scalars)
    return (sums * mx.array([term.weight for term in terms], dtype=mx.float32)).sum()


@dataclass
class CompanionHead:
    """A frozen companion model's side of the head loss for one micro-batch: its final-normed hidden states
    [n, its hidden] (its dtype, evaluated outside any gradient transformation, so no graph is kept behind
    them), its output matrix, its soft-cap, and the number of ids it shares with the student."""

    hidden: mx.array
    matrix: mx.array
    softcap: float | None
    shared: int

    def logits(self, part: slice) -> mx.array:
        """float32 soft-capped logits [chunk, shared] of the positions ``part``, constants for the gradient.
        The logits are restricted, not the matrix: a sliced matrix could be copied whole on every call."""
        logits = (self.hidden[part] @ self.matrix.T).astype(mx.float32)
        return mx.stop_gradient(soft_cap(logits, self.softcap)[:, : self.shared])


@dataclass
class CompanionCaptures:
    """What the transfer terms read of a frozen companion on one micro-batch, evaluated and without a graph:
    its hidden states by index (float32 [batch, seq, its hidden]) and its queries and keys by block (its
    dtype), with its config (attention scale, layer types, heads)."""

    config: Gemma3Config
    hidden_states: dict[int, mx.array]
    queries_keys: dict[int, tuple[mx.array, mx.array]]


def companion_passes(companions: Mapping[str, Gemma3ForCausalLM], loss: LossSpec, batch: Batch, student_vocab: int
                     ) -> tuple[dict[str, CompanionHead], dict[str, CompanionCaptures]]:
    """Each companion's backbone once on the batch's ids, positions and (its own) masks, in its own dtype,
    evaluated here (before the student's gradient transformation is traced): the head side of the
    Distillation terms' companions, and the captures the transfer terms read. Nothing else is evaluated, so
    a companion read by transfer terms alone runs no further than the last block they name."""
    heads, captures = {}, {}
    for name, companion in companions.items():
        masks = None if batch.companion_masks is None else batch.companion_masks[name]
        hidden_layers, query_key = loss.companion_hidden_layers(name), loss.companion_query_key_layers(name)
        out = companion.model(batch.ids, positions=batch.positions, mask=masks,
                              output_hidden_states=bool(hidden_layers), output_queries_keys=query_key)
        evaluated = []
        if name in loss.head_companions:
            hidden = mx.stop_gradient(out.last_hidden_state)
            hidden = hidden.reshape(-1, hidden.shape[-1])  # [batch * seq, its hidden]
            heads[name] = CompanionHead(hidden, companion.output_weight(), companion.config.final_logit_softcapping,
                                        shared_vocab(student_vocab, companion.config.vocab_size))
            evaluated.append(hidden)
        if hidden_layers or query_key:
            captures[name] = CompanionCaptures(
                companion.config,
                {i: mx.stop_gradient(hidden_state(out, i).astype(mx.float32)) for i in hidden_layers},
                {i: tuple(mx.stop_gradient(a) for a in out.queries_keys[i]) for i in query_key},
            )
            evaluated += [captures[name].hidden_states, captures[name].queries_keys]
        mx.eval(evaluated)
    return heads, captures


def hidden_state(out: Gemma3Output, index: int) -> mx.array:
    """Hidden state ``index`` in transformers' convention: the residual stream after ``index`` blocks, the
    last one after the final norm."""
    return out.last_hidden_state if index == len(out.hidden_states) - 1 else out.hidden_states[index]


def chunks(positions: int, chunk_tokens: int) -> list[slice]:
    """Runs of at most ``chunk_tokens`` of ``positions`` flattened positions."""
    if chunk_tokens < 1:
        raise InputError(f"chunk_tokens must be a positive number of positions, got {chunk_tokens}")
    return [slice(start, start + chunk_tokens) for start in range(0, positions, chunk_tokens)]


# --- one micro-batch ------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """A checked micro-batch (gemmalab.train.inputs.StepInputs) as MLX arrays."""

    ids: mx.array  # int32 [batch, seq]
    targets: mx.array  # int32 [batch, seq]
    weights: mx.array  # float32 [batch, seq]
    positions: mx.array | None  # int32 [batch, seq], with masks
    masks: dict[str, mx.array] | None  # layer type -> bool [batch, 1, seq, seq]
    extras: dict[str, mx.array]  # float32; int32 for teacher ids
    hidden_layers: tuple[int, ...]
    attention_layers: tuple[int, ...]
    query_key_layers: tuple[int, ...] = ()
    scalars: dict[str, float] = field(default_factory=dict)
    companion_masks: dict[str, dict[str, mx.array]] | None = None  # like masks, per companion

    def flat_extras(self, names: tuple[str, ...]) -> dict[str, mx.array]:
        """The named per-position extras flattened like the positions: [batch * seq, ...]."""
        rows = self.ids.shape[0] * self.ids.shape[1]
        return {name: self.extras[name].reshape(rows, *self.extras[name].shape[2:]) for name in names}


def batch_arrays(step: StepInputs) -> Batch:
    def put_masks(per_type: dict[str, np.ndarray]) -> dict[str, mx.array]:
        return {kind: mx.array(m[:, None]) for kind, m in per_type.items()}

    masks = None if step.masks is None else put_masks(step.masks)
    companion_masks = None if step.companion_masks is None else {  # the student's when prepare shared them
        name: masks if per_type is step.masks else put_masks(per_type) for name, per_type in step.companion_masks.items()
    }
    return Batch(
        ids=mx.array(step.inputs), targets=mx.array(step.targets), weights=mx.array(step.weights),
        positions=None if step.positions is None else mx.array(step.positions.astype(np.int32)), masks=masks,
        extras={name: mx.array(value) for name, value in step.extras.items()},
        hidden_layers=step.hidden_layers, attention_layers=step.attention_layers,
        query_key_layers=step.query_key_layers, scalars=dict(step.scalars), companion_masks=companion_masks,
    )


def backbone(model: Gemma3ForCausalLM, batch: Batch) -> Gemma3Output:
    """The text model's output: final-normed hidden states [batch, seq, hidden], and the captures the
    batch's aux and transfer terms read."""
    return model.model(batch.ids, positions=batch.positions, mask=batch.masks,
                       output_hidden_states=bool(batch.hidden_layers),
                       output_attentions=frozenset(batch.attention_layers),
                       output_queries_keys=batch.query_key_layers)


def aux_term_sums(loss: LossSpec, batch: Batch, out: Gemma3Output) -> list[mx.array]:
    """Per aux term of ``loss``, the sum of weights * its per-position loss (its weight not applied)."""
    sums = []
    for term in loss.aux:
        if isinstance(term, HiddenStateMSE):
            captured = hidden_state(out, term.layer)
        else:
            captured = out.attentions[term.layer]
        sums.append((aux_term(term, captured, batch.extras[term.targets]) * batch.weights).sum())
    return sums


def weighted_sum(terms: tuple, sums: list[mx.array]) -> mx.array | None:
    """sum of term.weight * its sum over ``terms``, the terms after the head (None when there are none)."""
    total = None
    for term, value in zip(terms, sums, strict=True):
        total = term.weight * value if total is None else total + term.weight * value
    return total


# --- the transfer terms (gemmalab/train/transfer.py has their definitions) --------------------------------------
def hidden_transfer(student: mx.array, teacher: mx.array, metric: str, projection: mx.array | None) -> mx.array:
    """Per-position loss [...] of hidden states [..., Ds] (any dtype; float32 here) and float32 [..., Dt],
    through ``projection`` [Dt, Ds] (None = the identity): 1 - cosine, or the mean squared error."""
    h = student.astype(mx.float32)
    if projection is not None:
        h = h @ projection.T  # [..., Dt]
    if metric == "mse":
        return hidden_mse(h, teacher)
    norms = mx.sqrt(h.square().sum(axis=-1)) * mx.sqrt(teacher.square().sum(axis=-1))
    return 1.0 - (h * teacher).sum(axis=-1) / mx.maximum(norms, transfer.COSINE_EPS)


def grouped_probs(q: mx.array, k: mx.array, mask: mx.array, scale: float, temperature: float,
                  groups: mx.array) -> mx.array:
    """One model's attention rows at ``temperature``, its heads averaged into groups: float32 [batch, G,
    rows, keys] of queries [batch, heads, rows, d], keys [batch, kv_heads, keys, d], a boolean mask [batch,
    1, rows, keys] and the averaging matrix [G, heads] (transfer.head_groups)."""
    scores = gqa_scores(q.astype(mx.float32), k.astype(mx.float32), scale)  # [batch, heads, rows, keys]
    probs = mx.softmax(mx.where(mask, scores / temperature, -mx.inf), axis=-1)
    return mx.einsum("gh,bhqk->bgqk", groups, probs)


@dataclass
class AttentionRows:
    """One attention transfer term on one micro-batch, all but the student's queries and keys: the
    teacher's queries and keys of its block (constants), the student's mask of its block's layer type, the
    teacher's (its own mask of its block's type and the student's: the keys both layers may see), the
    position weights [batch, seq], the attention scales (student, teacher) and the head groups."""

    term: AttentionTransfer
    teacher: tuple[mx.array, mx.array]
    student_mask: mx.array  # bool [batch, 1, seq, seq]
    teacher_mask: mx.array  # bool [batch, 1, seq, seq]
    weights: mx.array
    scales: tuple[float, float]
    groups: tuple[mx.array, mx.array]  # float32 [G, student heads], [G, teacher heads]

    def chunk_sum(self, q: mx.array, k: mx.array, part: slice) -> mx.array:
        """sum over the query rows ``part`` of weights * mean over groups of KL(T_g || S_g), from the
        student's queries of those rows [batch, heads, rows, d] and all its keys."""
        tau = self.term.temperature
        s = grouped_probs(q, k, self.student_mask[:, :, part], self.scales[0], tau, self.groups[0])
        q_t, k_t = self.teacher
        t = grouped_probs(q_t[:, :, part], k_t, self.teacher_mask[:, :, part], self.scales[1], tau, self.groups[1])
        return (attention_kl(s, mx.stop_gradient(t)) * self.weights[:, part]).sum()

    def parts(self) -> list[slice]:
        return chunks(self.weights.shape[1], self.term.query_chunk)

    def value(self, q: mx.array, k: mx.array) -> mx.array:
        """The term's sum without gradients, one evaluated chunk at a time."""
        return mx.array(sum(self.chunk_sum(q[:, :, part], k, part).item() for part in self.parts()), dtype=mx.float32)


def attention_rows(term: AttentionTransfer, student: Gemma3Config, batch: Batch, teacher: CompanionCaptures) -> AttentionRows:
    """The AttentionRows of ``term`` on ``batch`` (whose masks prepare always builds for such a term)."""
    student_mask = batch.masks[student.layer_types[term.student_layer]]
    own = batch.companion_masks[term.teacher][teacher.config.layer_types[term.teacher_layer]]
    groups = transfer.attention_groups(term, student, teacher.config)
    return AttentionRows(term, teacher.queries_keys[term.teacher_layer], student_mask, mx.logical_and(own, student_mask),
                         batch.weights, (student.attention_scale, teacher.config.attention_scale),
                         (mx.array(groups[0]), mx.array(groups[1])))


def attention_transfer_sum(q: mx.array, k: mx.array, rows: AttentionRows) -> mx.array:
    """The term's sum (its weight not applied) from the student's queries [batch, heads, seq, d] and keys
    [batch, kv_heads, seq, d], differentiable with respect to both. As in ``fused_head_loss``, the forward
    pass computes each chunk's value and gradients and evaluates them (copied out through numpy, so no
    graph is kept behind them) before the next chunk is built: one chunk's scores exist at a time, in the
    forward and in the backward pass, which only hands the gradients out."""
    grads: list[mx.array] = []  # float32 d/dq [batch, heads, seq, d] and d/dk, set by the forward pass

    @mx.custom_function
    def total(q: mx.array, k: mx.array) -> mx.array:
        q, k = mx.stop_gradient(q), mx.stop_gradient(k)  # differentiated here; the outer transformation sees the vjp
        grad_fn = mx.value_and_grad(rows.chunk_sum, argnums=(0, 1))
        value, q_parts, k_sum = 0.0, [], None
        for part in rows.parts():
            chunk_value, (d_q, d_k) = grad_fn(q[:, :, part], k, part)
            d_q, d_k = d_q.astype(mx.float32), d_k.astype(mx.float32)
            mx.eval(chunk_value, d_q, d_k)
            value += chunk_value.item()
            q_parts.append(mx.array(np.asarray(d_q)))
            k_sum = _add_into(k_sum, np.asarray(d_k))
        grads[:] = [mx.concatenate(q_parts, axis=2), mx.array(k_sum)]
        return mx.array(value, dtype=mx.float32)

    @total.vjp
    def total_vjp(primals, cotangent, output):
        q, k = primals
        return (cotangent * grads[0]).astype(q.dtype), (cotangent * grads[1]).astype(k.dtype)

    return total(q, k)


def transfer_term_sums(loss: LossSpec, student: Gemma3Config, batch: Batch, out: Gemma3Output,
                       companions: Mapping[str, CompanionCaptures], loss_parameters: Mapping[str, mx.array],
                       *, differentiable: bool = True) -> list[mx.array]:
    """Per transfer term of ``loss``, the sum of weights * its per-position loss (its weight not applied),
    from the student's captures ``out``, the companions' and the loss parameters (the projections); the
    attention terms without gradients unless ``differentiable``."""
    sums = []
    for term in loss.transfer:
        teacher = companions[term.teacher]
        if isinstance(term, HiddenStateTransfer):
            projection = None if term.projection is None else loss_parameters[term.projection]
            per_position = hidden_transfer(hidden_state(out, term.student_layer), teacher.hidden_states[term.teacher_layer],
                                           term.metric, projection)
            sums.append((per_position * batch.weights).sum())
        else:
            rows = attention_rows(term, student, batch, teacher)
            q, k = out.queries_keys[term.student_layer]
            sums.append(attention_transfer_sum(q, k, rows) if differentiable else rows.value(q, k))
    return sums


def chunked_loss_sum(model: Gemma3ForCausalLM, batch: Batch, loss: LossSpec, *, chunk_tokens: int,
                     companions: Mapping[str, Gemma3ForCausalLM] | None = None,
                     loss_parameters: Mapping[str, mx.array] | None = None) -> float:
    """The whole loss without gradients: the backbone once, then the head terms one chunk at a time, each
    evaluated before the next is built, so one chunk's logits exist at a time; then the aux and transfer
    terms. ``companions`` are the frozen models the Distillation and transfer terms read, ``loss_parameters``
    the projections these name."""
    out = backbone(model, batch)
    flat = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])  # [batch * seq, hidden]
    targets, weights = batch.targets.reshape(-1), batch.weights.reshape(-1)  # [batch * seq]
    extras = batch.flat_extras(loss.head_extras)
    heads, captures = companion_passes(companions or {}, loss, batch, model.config.vocab_size)
    total = 0.0
    for part in chunks(flat.shape[0], chunk_tokens):
        logits = model.logits_from_hidden(flat[part]).astype(mx.float32)  # [chunk, vocab]
        chunk_extras = {name: value[part] for name, value in extras.items()}
        teachers = {name: head.logits(part) for name, head in heads.items()}
        total += chunk_loss(logits, targets[part], weights[part], loss.head, chunk_extras, teachers, batch.scalars).item()
    sums = aux_term_sums(loss, batch, out)
    sums += transfer_term_sums(loss, model.config, batch, out, captures, loss_parameters or {}, differentiable=False)
    rest = weighted_sum(loss.aux + loss.transfer, sums)
    return total + (0.0 if rest is None else rest.item())


@dataclass
class HeadLossResult:
    """What ``fused_head_loss`` leaves once its forward pass has run: the unscaled loss sum, and the
    gradient of loss_scale * loss with respect to the head weight (float32), or None when not asked."""

    loss: float = 0.0
    weight_grad: mx.array | None = None
    aux: mx.array | None = None  # the aux and transfer terms' unscaled weighted sum, set by the trainer
    term_sums: np.ndarray | None = None  # float64 [head terms]: each head term's sum, its weight not applied
    aux_sums: list[mx.array] = field(default_factory=list)  # each aux term's sum, set by the trainer
    transfer_sums: list[mx.array] = field(default_factory=list)  # each transfer term's sum, likewise


def fused_head_loss(
    hidden: mx.array,
    head_weight: mx.array,
    targets: mx.array,
    weights: mx.array,
    *,
    spec: TrainSpec,
    logit_cap: float | None,
    loss_scale: float,
    weight_grad: bool,
    extras: Mapping[str, mx.array] | None = None,
    companions: Mapping[str, CompanionHead] | None = None,
    scalars: Mapping[str, float] | None = None,
) -> tuple[mx.array, HeadLossResult]:
    """The output head and the head terms of ``spec.loss`` on final-normed hidden states [n, hidden] (with
    ``extras``, the terms' per-position inputs [n, ...], ``companions``, the frozen teachers the Distillation
    terms read, whose chunk logits are built and dropped beside the student's, and the step's ``scalars``),
    in chunks of ``spec.loss_chunk_tokens`` positions, doing the work of the backward pass in the forward pass.

    Returns ``loss_scale * loss sum`` as an array differentiable with respect to ``hidden`` (the gradient
    is computed here and handed out by the backward pass), and a ``HeadLossResult`` that holds the
    unscaled loss and, with ``weight_grad``, the head weight's gradient. The head weight [vocab, hidden]
    is a plain float32 array, cast here to the compute dtype of ``spec.precision``: its gradient is
    returned rather than differentiated, so the caller adds it to a tied embedding's own.

    Each chunk's logits, loss and gradients are evaluated, and copied out through numpy, before the next
    chunk is built. Evaluating alone would not free them: MLX allocates an op's output when the graph is
    dispatched, ahead of the computation, so a lazily built chunked loss dispatches all chunks side by
    side; and inside a gradient transformation it keeps the graph behind every evaluated array (for the
    backward pass), and with it every intermediate buffer. A copy made from host memory has no graph.
    """
    compute_dtype = COMPUTE_DTYPES[spec.precision]
    terms = spec.loss.head
    result = HeadLossResult(term_sums=np.zeros(len(terms)))
    term_weights = mx.array([term.weight for term in terms], dtype=mx.float32)

    extras = dict(extras or {})
    companions = dict(companions or {})

    def part_loss(
        h: mx.array, w: mx.array, t: mx.array, wt: mx.array, ex: dict[str, mx.array], teachers: dict[str, mx.array]
    ) -> tuple[mx.array, mx.array, mx.array]:
        w = w if compute_dtype is None else w.astype(compute_dtype)
        logits = soft_cap(h @ w.T, logit_cap).astype(mx.float32)  # [chunk, vocab]
        sums = chunk_term_sums(logits, t, wt, terms, ex, teachers, scalars)
        loss = (sums * term_weights).sum()
        return loss * loss_scale, loss, sums  # the gradient is of the first

    hidden_grads: list[mx.array] = []  # float32 [chunk, hidden] each, no graph behind them

    @mx.custom_function
    def scaled_loss(hidden: mx.array) -> mx.array:
        hidden = mx.stop_gradient(hidden)  # differentiated here; the outer transformation sees the vjp
        grad_fn = mx.value_and_grad(part_loss, argnums=(0, 1) if weight_grad else 0)
        weight_sum = None  # float32 numpy [vocab, hidden]: added to in place, one buffer for all chunks
        for part in chunks(hidden.shape[0], spec.loss_chunk_tokens):
            chunk_extras = {name: value[part] for name, value in extras.items()}
            teachers = {name: head.logits(part) for name, head in companions.items()}
            (_, loss, sums), grads = grad_fn(hidden[part], head_weight, targets[part], weights[part], chunk_extras,
                                             teachers)
            d_hidden, d_weight = grads if weight_grad else (grads, None)
            d_hidden = d_hidden.astype(mx.float32)
            mx.eval(loss, sums, d_hidden, d_weight)
            result.loss += loss.item()
            result.term_sums += np.array(sums, np.float64)
            hidden_grads.append(mx.array(np.asarray(d_hidden)))
            if d_weight is not None:
                weight_sum = _add_into(weight_sum, np.asarray(d_weight))
        if weight_sum is not None:
            result.weight_grad = mx.array(weight_sum)
        return mx.array(result.loss * loss_scale, dtype=mx.float32)

    @scaled_loss.vjp
    def scaled_loss_vjp(primals, cotangent, output):
        hidden = primals  # with one argument, MLX passes the array itself and expects one array back
        return (cotangent * mx.concatenate(hidden_grads)).astype(hidden.dtype)

    return scaled_loss(hidden), result


def _add_into(total: np.ndarray | None, part: np.ndarray) -> np.ndarray:
    """``total + part`` in ``total``'s buffer (one buffer for all chunks); a copy of ``part`` at first (a view
    of MLX's buffer, which the next chunk may reuse)."""
    return part.copy() if total is None else np.add(total, part, out=total)


# --- precision ----------------------------------------------------------------------------------------------
def _float16_policy(model: Gemma3ForCausalLM, on: bool) -> None:
    """Switch a float32-built model to the float16 policy of gemmalab_mlx.model (its docstring) and back:
    the residual stream and the post-norms in float32, the pre-norms and the final norm feeding the
    float16 matmuls. Gemma's residual stream outgrows float16 on real checkpoints."""
    text = model.model
    compute, residual = (mx.float16, mx.float32) if on else (None, None)
    text.residual_dtype = residual
    text.norm.out_dtype = compute
    for layer in text.layers:
        layer.input_layernorm.out_dtype = layer.pre_feedforward_layernorm.out_dtype = compute
        layer.post_attention_layernorm.out_dtype = layer.post_feedforward_layernorm.out_dtype = residual


@contextmanager
def compute_precision(model: Gemma3ForCausalLM, precision: str) -> Iterator[None]:
    """A scope in which the float32 model may compute in ``precision`` (see ``cast_parameters``); on exit
    it holds its float32 master parameters again (also dropping the traced copies that value_and_grad
    and the block checkpoints leave bound), and the float16 policy is off.

    The scope must cover the whole value-and-grad call, not just the function it differentiates: the
    backward pass is built after that function returns, and the block checkpoints rerun their blocks
    then, reading the cast parameters and the policy.
    """
    master = model.parameters()
    if precision == "fp16":
        _float16_policy(model, True)
    try:
        yield
    finally:
        model.update(master)
        if precision == "fp16":
            _float16_policy(model, False)


def cast_parameters(model: Gemma3ForCausalLM, precision: str) -> None:
    """Replace every parameter by its cast to the compute dtype of ``precision`` (inside a
    ``compute_precision`` scope; nothing to do for "fp32"). Called inside a differentiated function, the
    gradients flow back through the casts to the float32 parameters, arriving in float32."""
    dtype = COMPUTE_DTYPES[precision]
    if dtype is not None:
        model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))


# --- the trainer --------------------------------------------------------------------------------------------
def frozen_companions(model: Gemma3ForCausalLM, loss: LossSpec,
                      companions: Mapping[str, Gemma3ForCausalLM] | None) -> dict[str, Gemma3ForCausalLM]:
    """The companion models the loss reads (checked by spec.check_companions), frozen (``Module.freeze``);
    they are never part of the student's gradient transformation either (companion_passes)."""
    companions = dict(companions or {})
    for name, companion in companions.items():
        if not isinstance(companion, Gemma3ForCausalLM):
            raise InputError(f"companion {name!r} is a {type(companion).__name__}, not a model of this backend: "
                             "build it with the same backend's build(...)")
        if companion is model:
            raise InputError(f"companion {name!r} is the model being trained: a companion is frozen, so build a "
                             "separate copy (backend.build(config, backend.weights(model), dtype=...))")
        if companion.shape_only:
            raise InputError(f"companion {name!r} was built shape-only (weights=None): build it with weights")
    check_companions(loss, model.config, {name: c.config for name, c in companions.items()})
    for companion in companions.values():
        companion.freeze()
    return companions


class Trainer:
    """gemmalab.train.spec.BackendTrainer for a float32 gemmalab_mlx.model.Gemma3ForCausalLM, with frozen
    ``companions`` (name -> a model of any dtype built by this backend) for the loss's Distillation and
    transfer terms, and the loss's trainable parameters (its projections) starting from ``loss_parameters``
    (name -> float32 array; None = fresh ones from seed 0, transfer.checked_loss_parameters)."""

    def __init__(self, model: Gemma3ForCausalLM, spec: TrainSpec,
                 companions: Mapping[str, Gemma3ForCausalLM] | None = None,
                 loss_parameters: Mapping[str, np.ndarray] | None = None):
        if model.dtype != "float32":
            raise InputError(
                f"training needs the model in float32 (master weights), got {model.dtype}: "
                "build it with dtype='float32' and choose the compute precision in the spec"
            )
        if spec.precision not in COMPUTE_DTYPES:
            raise InputError(f"precision must be one of {', '.join(COMPUTE_DTYPES)}, got {spec.precision!r}")
        if spec.optimizer.name not in ("adamw", "adafactor"):
            raise InputError(f"optimizer must be 'adamw' or 'adafactor', got {spec.optimizer.name!r}")
        self.model, self.spec = model, spec
        self.companions = frozen_companions(model, spec.loss, companions)
        start = transfer.checked_loss_parameters(spec.loss, model.config,
                                                 {name: c.config for name, c in self.companions.items()}, loss_parameters)
        with mx.stream(self._stream):
            self.loss_params: dict[str, mx.array] = {name: mx.array(value) for name, value in start.items()}
        self.term_names = spec.loss.term_names()
        self._term_sums: dict[str, float] = {}  # of the last accumulate
        model.model.gradient_checkpointing = spec.grad_checkpointing
        # canonical names (the tied head once), and wrapped linears' <linear>.base.weight and <linear>.<param>
        self.names = [name for name, _ in tree_flatten(model.parameters())]
        tied = model.config.tie_word_embeddings
        # The head's gradient comes from fused_head_loss as d(loss)/d(dense head matrix); an untied head may be
        # a wrapper (linears.py), whose own parameters then get that gradient through its fuse().
        self.head: nn.Module = model.model.embed_tokens if tied else model.lm_head
        self.head_prefix = "model.embed_tokens." if tied else "lm_head."
        self.head_names = [name for name in self.names if name.startswith(self.head_prefix)]
        self.scales: dict[str, float] = {}  # of the model's parameters and the loss parameters
        self.grads: dict[str, mx.array] = {}  # the float32 accumulator of the trainable parameters
        self.optimizers: dict[str, optim.Optimizer] = {}  # one per parameter, made at its first update
        self._loss_and_grad = mx.value_and_grad(self._parameters_loss, argnums=(0, 1))
        self.set_lr_scales({})

    @property
    def _stream(self) -> mx.Device:
        return self.model.device or mx.default_device()

    def _parameters_loss(self, params: dict, loss_params: dict[str, mx.array], *args) -> mx.array:
        """``_scaled_loss`` as a function of the model's trainable parameters and the trained loss
        parameters (what nn.value_and_grad does for a model alone); the frozen loss parameters are constants."""
        self.model.update(params)
        return self._scaled_loss(*args, {**self.loss_params, **loss_params})

    def _scaled_loss(
        self, batch: Batch, head_weight: mx.array, loss_scale: float, results: list[HeadLossResult],
        companions: dict[str, CompanionHead], captures: dict[str, CompanionCaptures],
        loss_params: dict[str, mx.array],
    ) -> mx.array:
        """loss_scale * loss sum of one micro-batch (what ``accumulate`` differentiates); appends the
        head's HeadLossResult to ``results``, its ``aux`` holding the unscaled weighted sum of the aux and
        transfer terms. ``companions`` and ``captures`` are the frozen teachers' evaluated head sides and
        captures (constants here), ``loss_params`` the loss parameters."""
        cast_parameters(self.model, self.spec.precision)
        out = backbone(self.model, batch)
        hidden = out.last_hidden_state  # [batch, seq, hidden]
        loss, result = fused_head_loss(
            hidden.reshape(-1, hidden.shape[-1]),  # [batch * seq, hidden]
            head_weight,
            batch.targets.reshape(-1),
            batch.weights.reshape(-1),
            spec=self.spec,
            logit_cap=self.model.config.final_logit_softcapping,
            loss_scale=loss_scale,
            weight_grad=self._head_trains,
            extras=batch.flat_extras(self.spec.loss.head_extras),
            companions=companions,
            scalars=batch.scalars,
        )
        loss_spec = self.spec.loss
        result.aux_sums = aux_term_sums(loss_spec, batch, out)
        result.transfer_sums = transfer_term_sums(loss_spec, self.model.config, batch, out, captures, loss_params)
        result.aux = weighted_sum(loss_spec.aux + loss_spec.transfer, result.aux_sums + result.transfer_sums)
        results.append(result)
        return loss if result.aux is None else loss + loss_scale * result.aux

    def accumulate(self, inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray, *,
                   positions: np.ndarray | None = None, mask: np.ndarray | None = None,
                   extras: Mapping[str, np.ndarray] | None = None, scalars: Mapping[str, float] | None = None,
                   loss_scale: float = 1.0) -> float:
        """Forward and backward on one micro-batch (``_accumulate``), in training mode (adapter dropout): the
        model is back in inference mode afterwards, so evaluations between steps see no dropout."""
        self.model.train()
        try:
            return self._accumulate(inputs, targets, weights, positions=positions, mask=mask, extras=extras,
                                    scalars=scalars, loss_scale=loss_scale)
        finally:
            self.model.eval()

    def _accumulate(
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
        accumulated gradients of the trainable parameters. Returns the unscaled loss sum.

        One ``mx.value_and_grad`` over the trainable parameters (the model's, the head weight excepted, and
        the loss parameters): fused_head_loss computes the head weight's gradient (and the hidden states')
        chunk by chunk in the forward pass, as attention_transfer_sum does the captured queries' and keys',
        and the transformation carries those back through the backbone, with the aux and transfer terms'.
        The companions' backbones run first, outside the transformation, and are evaluated: the student's
        gradient never reaches them, and their graphs are not kept.
        """
        step = prepare(self.model.config, self.spec.loss, inputs, targets, weights, positions=positions,
                       mask=mask, extras=extras, scalars=scalars,
                       companions={name: c.config for name, c in self.companions.items()})
        batch = batch_arrays(step)
        # The dense float32 head matrix, read (or fused) before value_and_grad swaps in tracers.
        head_weight = self.model.output_weight()
        untied_head = not self.model.config.tie_word_embeddings
        # Whether anything but the head trains: the tied head is also the embedding, which does.
        backbone_trains = any(self.scales[name] for name in self.names if name not in self.head_names or not untied_head)
        trained_loss_params = {name: value for name, value in self.loss_params.items() if self.scales[name]}
        results: list[HeadLossResult] = []
        grads: dict[str, mx.array] = {}
        with mx.stream(self._stream):  # in their own dtype: outside the student's compute-precision scope
            heads, captures = companion_passes(self.companions, self.spec.loss, batch, self.model.config.vocab_size)
        with mx.stream(self._stream), compute_precision(self.model, self.spec.precision):
            args = (batch, head_weight, loss_scale, results, heads, captures)
            if backbone_trains or trained_loss_params:
                if untied_head:  # its gradient comes from fused_head_loss, not from the transformation
                    self.model.lm_head.freeze()
                try:
                    _, (tree, loss_grads) = self._loss_and_grad(self.model.trainable_parameters(), trained_loss_params,
                                                                *args)
                finally:
                    if untied_head:
                        self._freeze_by_scales()
                grads = {**dict(tree_flatten(tree)), **loss_grads}
            else:  # only the untied head trains, or nothing: no backbone gradients at all
                self._scaled_loss(*args, self.loss_params)
            for name, grad in self._head_gradients(results[0].weight_grad).items():
                grads[name] = grads[name] + grad if name in grads else grad
            for name, grad in grads.items():
                previous = self.grads.get(name)
                self.grads[name] = grad if previous is None else previous + grad
            mx.eval(self.grads)
            aux = results[0].aux
            sums = [*results[0].term_sums.tolist(),
                    *(value.item() for value in results[0].aux_sums + results[0].transfer_sums)]
        self._term_sums = dict(zip(self.term_names, sums, strict=True))
        return results[0].loss + (0.0 if aux is None else aux.item())

    def term_sums(self) -> dict[str, float]:
        return dict(self._term_sums)

    @property
    def _head_trains(self) -> bool:
        return any(self.scales[name] != 0.0 for name in self.head_names)

    def _head_gradients(self, dense: mx.array | None) -> dict[str, mx.array]:
        """The head's trainable parameters' gradients from d(loss)/d(dense head matrix): that matrix itself
        for a plain head; for a wrapper, the vector-Jacobian product through its fuse(), taken as the
        gradient of sum(fuse() * dense) (frozen parameters get none)."""
        if dense is None:
            return {}
        if not isinstance(self.head, Wrapper):
            return {self.head_prefix + "weight": dense}
        dense = mx.stop_gradient(dense)
        _, tree = nn.value_and_grad(self.head, lambda: (self.head.fuse().astype(mx.float32) * dense).sum())()
        return {self.head_prefix + name: grad for name, grad in tree_flatten(tree)}

    def gradients(self) -> dict[str, np.ndarray]:
        """The accumulated gradients of the trainable parameters, float32 numpy, canonical names (and the
        loss parameters' under theirs)."""
        return {name: np.array(grad) for name, grad in self.grads.items()}

    def loss_parameters(self) -> dict[str, np.ndarray]:
        """The loss parameters' current values (the projections), float32 numpy copies, by name."""
        return {name: np.array(value) for name, value in self.loss_params.items()}

    def apply(self, lr: float, normalizer: float) -> dict[str, float]:
        """Normalise, clip and take one optimizer step (see gemmalab.train.spec.BackendTrainer.apply)."""
        grads, self.grads = self.grads, {}
        if not grads:
            return {"grad_norm": 0.0}
        with mx.stream(self._stream):
            grads = {name: grad / normalizer for name, grad in grads.items()}
            if self.spec.max_grad_norm is None:
                norm = mx.sqrt(sum((g.square().sum() for g in grads.values()), mx.array(0.0)))
            else:
                # g * min(1, max_norm / (norm + 1e-6)): spec.py's formula is MLX's.
                grads, norm = optim.clip_grad_norm(grads, self.spec.max_grad_norm)
            grad_norm = float(norm)
            if not math.isfinite(grad_norm):
                return {"grad_norm": grad_norm}  # nothing updated; the accumulator is already empty
            params = {**dict(tree_flatten(self.model.parameters())), **self.loss_params}
            updated = {
                name: self._update(name, grad, params[name], lr * self.scales[name])
                for name, grad in grads.items()
            }
            self.model.update(tree_unflatten([(n, v) for n, v in updated.items() if n not in self.loss_params]))
            self.loss_params.update({n: v for n, v in updated.items() if n in self.loss_params})
            mx.eval(updated, [self.optimizers[name].state for name in updated])
        return {"grad_norm": grad_norm}

    def _optimizer(self, name: str) -> optim.Optimizer:
        if name not in self.optimizers:
            opt = self.spec.optimizer
            if opt.name == "adamw":
                self.optimizers[name] = optim.AdamW(
                    learning_rate=0.0,  # set before every step
                    betas=list(opt.betas),
                    eps=opt.eps,
                    weight_decay=opt.weight_decay,
                    bias_correction=True,
                )
            else:
                self.optimizers[name] = optim.Adafactor(
                    learning_rate=1.0,  # the step size is applied in _update (see the module docstring)
                    eps=opt.eps_adafactor,
                    clip_threshold=opt.clip_threshold,
                    decay_rate=-opt.decay_rate,
                    beta_1=opt.beta1,
                    weight_decay=0.0,
                    scale_parameter=False,
                    relative_step=False,
                )
        return self.optimizers[name]

    def _update(self, name: str, grad: mx.array, param: mx.array, lr: float) -> mx.array:
        """The parameter after one step of its optimizer (lazy)."""
        optimizer = self._optimizer(name)
        if self.spec.optimizer.name == "adamw":
            optimizer.learning_rate = lr
            return optimizer.apply_gradients({"w": grad}, {"w": param})["w"]
        # Fed a zero parameter (its scale is unused: scale_parameter=False), MLX's Adafactor returns
        # 0 - 1 * u: minus the clipped (and, with beta1, averaged) update u, exactly.
        direction = optimizer.apply_gradients({"w": grad}, {"w": mx.zeros((), param.dtype)})["w"]
        opt = self.spec.optimizer
        step = lr * mx.maximum(opt.eps_adafactor[1], mx.sqrt(mx.mean(param.square())))  # rms(p) before update
        return param * (1 - lr * opt.weight_decay) + step * direction

    def set_lr_scales(self, scales: Mapping[str, float]) -> None:
        """Per-parameter learning-rate multipliers by canonical name or loss-parameter name (missing = 1.0);
        0 freezes."""
        names = [*self.names, *self.loss_params]
        unknown = sorted(set(scales) - set(names))
        if unknown:
            raise InputError(f"learning-rate scales name parameters this model does not have: {unknown[:3]}")
        self.scales = {name: float(scales.get(name, 1.0)) for name in names}
        self._freeze_by_scales()
        for name, scale in self.scales.items():
            if scale == 0.0:
                self.grads.pop(name, None)  # no gradient is kept for a frozen parameter

    def _freeze_by_scales(self) -> None:
        """Freeze exactly the parameters whose scale is 0 (value_and_grad then computes no gradient for them)."""
        self.model.unfreeze()
        modules = dict(self.model.named_modules())
        for name in self.names:  # the loss parameters are frozen by leaving them out of value_and_grad
            if self.scales[name] == 0.0:
                owner, _, key = name.rpartition(".")
                modules[owner].freeze(recurse=False, keys=[key])

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The canonical state of gemmalab/train/spec.py: MLX's Adafactor keeps its names, its AdamW's
        ``m`` and ``v`` are ``exp_avg`` and ``exp_avg_sq``, and the optimizer's uint64 step count is the
        parameter's ``step`` (int64 [1]). The learning rate is not state: apply sets it every step."""
        canonical = CANONICAL_NAMES[self.spec.optimizer.name]
        out = {}
        for name, optimizer in self.optimizers.items():
            out[f"step/{name}"] = np.array([optimizer.step.item()], dtype=np.int64)
            for key, value in optimizer.state["w"].items():
                out[f"{canonical[key]}/{name}"] = np.array(value)
        return out

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a canonical state, written by any backend (checked by spec.check_optimizer_state)."""
        params = {**dict(tree_flatten(self.model.parameters())), **self.loss_params}
        shapes = {name: tuple(value.shape) for name, value in params.items()}
        checked = check_optimizer_state(state, self.spec.optimizer, shapes)
        self.optimizers = {}
        mlx_names = {canonical: key for key, canonical in CANONICAL_NAMES[self.spec.optimizer.name].items()}
        for name, values in checked.items():
            optimizer = self._optimizer(name)
            step = mx.array(int(values.pop("step")[0]), dtype=mx.uint64)
            optimizer.state = {
                **optimizer.state,
                "step": step,
                "w": {mlx_names[k]: mx.array(v) for k, v in values.items()},
            }


# mlx.optimizers' state names -> gemmalab/train/spec.py's, per optimizer (Adafactor's are spec.py's already)
CANONICAL_NAMES = {
    "adamw": {"m": "exp_avg", "v": "exp_avg_sq"},
    "adafactor": {name: name for name in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg")},
}


__all__ = [
    "AttentionRows",
    "Batch",
    "CompanionCaptures",
    "CompanionHead",
    "Trainer",
    "aux_term",
    "aux_term_sums",
    "attention_kl",
    "attention_rows",
    "attention_transfer_sum",
    "backbone",
    "batch_arrays",
    "cached_distillation",
    "cast_parameters",
    "chunk_loss",
    "chunk_term_sums",
    "chunked_loss_sum",
    "chunks",
    "companion_passes",
    "compute_precision",
    "cross_entropy",
    "divergence",
    "frozen_companions",
    "fused_head_loss",
    "grouped_probs",
    "head_term",
    "hidden_mse",
    "hidden_state",
    "hidden_transfer",
    "HeadLossResult",
    "soft_target_cross_entropy",
    "transfer_term_sums",
    "weighted_sum",
]
