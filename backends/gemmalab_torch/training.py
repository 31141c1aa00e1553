"""Training on PyTorch: the chunked loss, gradient accumulation, clipping and the optimizer step behind
gemmalab.train.spec.BackendTrainer. The formulas are in gemmalab/train/spec.py.

AdamW is ``torch.optim.AdamW``, which computes spec.py's formula as it stands. Adafactor is written here:
``torch.optim.Adafactor`` (torch 2.13) caps the step size at 1/sqrt(t), and guards the second moment with
``clamp(min=eps1**2)``, which for eps1 = 1e-30 underflows to 0 in float32, so a parameter row whose
gradient is all zero (the embedding row of a token absent from the batch) gets 0 * inf = NaN.

Companion models (frozen distillation teachers, ``Trainer(..., companions=)``) have ``requires_grad`` off on
every parameter and run under ``no_grad`` in their own dtype (outside the student's autocast): their backbone
once per micro-batch, capturing what the transfer terms read, their output head per chunk beside the
student's, inside ``ChunkedHeadLoss``.

Transfer terms (gemmalab/train/transfer.py) compare the student's captures with a companion's: hidden states
through the trainer's *loss parameters* (projections, trainable parameters outside the model, in the
optimizer beside the model's), and attention rows recomputed from the captured queries and keys a chunk of
query rows at a time, each chunk under ``torch.utils.checkpoint`` so that one chunk's [batch, heads, rows,
keys] scores are alive at a time, in the backward pass too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from gemmalab.errors import InputError
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
    LossSpec,
    TransferTerm,
    shared_vocab,
)
from gemmalab.train.spec import TrainSpec, check_companions, check_optimizer_state
from gemmalab.train.transfer import COSINE_EPS, checked_loss_parameters, head_groups

from .model import Gemma3ForCausalLM, Gemma3Output

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Devices with torch's fused AdamW kernel (torch 2.4+ on the CPU).
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


# --- the loss terms (gemmalab/train/losses.py has their definitions) --------------------------------------------
def cross_entropy(logits: Tensor, targets: Tensor, smoothing: float) -> Tensor:
    """Per-position cross-entropy [n] of float32 logits [n, vocab], label-smoothed."""
    lse = torch.logsumexp(logits, dim=-1)  # [n]
    nll = lse - logits.gather(-1, targets[:, None])[:, 0]
    return nll if smoothing == 0 else (1 - smoothing) * nll + smoothing * (lse - logits.mean(-1))


def soft_target_cross_entropy(logits: Tensor, probs: Tensor, temperature: float) -> Tensor:
    """Per-position ``T^2 * -sum_v q_v log softmax(z / T)_v`` [n]."""
    return temperature**2 * -(probs * torch.log_softmax(logits / temperature, dim=-1)).sum(-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def divergence(student: Tensor, teacher: Tensor, term: Distillation, temperature: float) -> Tensor:
    """Per-position divergence [n] of float32 logits [n, shared] (losses.divergence has the formulas)."""
    log_s = torch.log_softmax(student / temperature, dim=-1)
    log_t = torch.log_softmax(teacher / temperature, dim=-1)
    kind, beta = term.divergence, term.beta
    if kind == "fkl" or (kind == "jsd" and beta == 0):
        per_position = _kl(log_t, log_s)
    elif kind == "rkl" or (kind == "jsd" and beta == 1):
        per_position = _kl(log_s, log_t)
    elif kind == "jsd":
        log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))  # the mixture
        per_position = beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
    else:
        per_position = 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)
    return temperature**2 * per_position if term.t2_scaling else per_position


def cached_distillation(logits: Tensor, term: CachedDistillation, ids: Tensor, logprobs: Tensor,
                        tail: Tensor | None) -> Tensor:
    """Per-position loss [n] of float32 logits [n, vocab] against cached teacher targets: ids int64 [n, k],
    their log-probabilities [n, k] and, for top-k, the tail mass [n] (losses.cached_distillation has the
    formulas). log q_rest is a log-sum-exp over the ids not kept (the kept ones masked to -inf), not
    log(1 - sum q_kept): that difference loses q_rest to cancellation in float32 once the kept ids hold
    nearly all the mass, which is when its gradient matters most."""
    z = logits / term.temperature
    lse = torch.logsumexp(z, dim=-1)  # [n]
    log_q = z.gather(-1, ids) - lse[:, None]  # [n, k]
    if term.estimator == "sampled":
        per_position = -log_q.mean(-1)
    else:
        kept = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, ids, True)  # [n, vocab]
        # A row whose kept ids cover the vocabulary (k = vocabulary) has no rest bucket: its rest term is 0.
        # Its mask is lifted, so no log-sum-exp runs over -inf alone (a NaN in the backward pass).
        has_rest = ~kept.all(-1)  # [n]
        log_q_rest = torch.logsumexp(z.masked_fill(kept & has_rest[:, None], -math.inf), dim=-1) - lse  # [n]
        rest = tail * (tail.clamp_min(LOG_FLOOR).log() - log_q_rest)  # 0 log 0 = 0 at r = 0
        per_position = (logprobs.exp() * (logprobs - log_q)).sum(-1) + torch.where(has_rest, rest, 0.0)
    return term.temperature**2 * per_position if term.t2_scaling else per_position


def head_term(term: HeadTerm, logits: Tensor, targets: Tensor, extras: Mapping[str, Tensor],
              companions: Mapping[str, Tensor] | None = None, scalars: Mapping[str, float] | None = None) -> Tensor:
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


def aux_term(term: AuxTerm, captured: Tensor, target: Tensor) -> Tensor:
    """One auxiliary term's per-position loss [batch, seq] (its weight not applied)."""
    if isinstance(term, HiddenStateMSE):
        return (captured.float() - target).square().mean(-1)
    p = captured.float().clamp_min(LOG_FLOOR).log()  # [batch, heads, seq, keys]
    return (target * (target.clamp_min(LOG_FLOOR).log() - p)).sum(-1).mean(1)


# --- the chunked head loss ------------------------------------------------------------------------------------
class ChunkedHeadLoss(torch.autograd.Function):
    """sum over positions of weights * (the head terms of a LossSpec) of hidden states [n, dim] through the
    output matrix [vocab, dim], computed ``chunk`` positions at a time, with its gradient computed in the
    same pass (as Liger-Kernel's fused linear cross-entropy does): per chunk, logits -> loss ->
    d(loss)/d(logits) -> the gradient matmuls, then the chunk's [chunk, vocab] buffers are dropped. So
    [n, vocab] logits never exist and nothing is recomputed in the backward pass, which only scales the
    stored gradients. Only the gradients autograd asks for are computed: none for a frozen head.

    d(loss)/d(logits) comes from autograd on the chunk, except for plain cross-entropy, whose formula is
    written out in place to keep its speed and memory: weight * (softmax - (1 - eps) * onehot(target) -
    eps / vocab), times the soft-cap's derivative (1 - tanh^2) when the model caps its logits; and for the
    usual distillation mix, cross-entropy plus forward KL (``distillation_loss(divergence="fkl")``), whose
    KL gradient is written out beside it (see ``_cross_entropy_fkl_and_grad``).

    Companion models (``CompanionHead``, frozen teachers) have their chunk's logits computed beside the
    student's, without gradients, and dropped with them. Returns (the weighted total, the per-term sums
    [terms] with the terms' weights not applied; not differentiable).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, matrix: Tensor, targets: Tensor, weights: Tensor, terms: tuple[HeadTerm, ...],
                chunk: int, softcap: float | None, companions: Mapping[str, CompanionHead],
                scalars: Mapping[str, float], extra_names: tuple[str, ...], *extra_values: Tensor) -> tuple[Tensor, Tensor]:
        compute = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else matrix.dtype
        grad_h, grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # fp16 would round the logit gradients (probabilities ~1/vocab are fp16 subnormals at 262k ids) before
        # any loss scale reaches them: its gradient matmuls run in float32 instead.
        grad_dtype = torch.float32 if compute == torch.float16 else compute
        extras = dict(zip(extra_names, extra_values, strict=True))
        with torch.autocast(hidden.device.type, enabled=False):
            matrix_c = matrix.to(compute)  # one cast per call, not per chunk
            matrix_g = matrix_c if grad_dtype == compute else matrix.to(grad_dtype)
            grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if grad_h else None
            # Not zeroed: the first chunk writes it, the others add into it (no zeros pass, no temporary the
            # size of the matrix, 671 MB at 262k ids).
            grad_matrix = torch.empty_like(matrix, dtype=torch.float32) if grad_w else None
            written = False
            sums = torch.zeros(len(terms), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                part = slice(start, start + chunk)
                h, t, w = hidden[part].to(compute), targets[part], weights[part]
                logits = _vocab_major_logits(matrix_c, h)  # [c, vocab]
                chunk_extras = {name: value[part] for name, value in extras.items()}
                if len(terms) == 1 and isinstance(terms[0], CrossEntropy):
                    term_sum, d_logits = _cross_entropy_and_grad(logits, t, w, terms[0], softcap, grad_h or grad_w)
                elif _is_cross_entropy_and_forward_kl(terms):
                    ce, kd = terms
                    term_sum, d_logits = _cross_entropy_fkl_and_grad(
                        logits, t, w, ce, kd, companions[kd.teacher].logits(part), kd.temperature_at(scalars), softcap,
                        grad_h or grad_w)
                else:
                    teachers = {name: head.logits(part) for name, head in companions.items()}
                    term_sum, d_logits = _terms_and_grad(logits, t, w, terms, chunk_extras, softcap,
                                                         grad_h or grad_w, teachers, scalars)
                sums += term_sum
                if d_logits is None:
                    continue
                d_c = d_logits.to(grad_dtype)
                if grad_h:
                    grad_hidden[part] = (d_c @ matrix_g).float()
                if grad_w:
                    h_g = h.to(grad_dtype)
                    if grad_dtype != torch.float32:  # a bf16 product, summed in float32
                        product = (d_c.T @ h_g).float()
                        if written:
                            grad_matrix.add_(product)
                        else:
                            grad_matrix.copy_(product)
                    elif written:  # addmm_ itself, written with out= (torch's profilers count addmm, not addmm_)
                        torch.addmm(grad_matrix, d_c.T, h_g, out=grad_matrix)
                    else:
                        torch.mm(d_c.T, h_g, out=grad_matrix)
                    written = True
            if grad_w and not written:  # no chunk carried a gradient
                grad_matrix.zero_()
        # Kept on the context, not saved for backward: they are neither inputs nor outputs, and backward hands
        # them to autograd as they are (scaled in place when the loss was scaled).
        ctx.grads = (grad_hidden, grad_matrix)
        ctx.mark_non_differentiable(sums)
        total = (sums * torch.tensor([term.weight for term in terms], device=sums.device)).sum()
        return total, sums

    @staticmethod
    def backward(ctx, grad_output: Tensor, _grad_sums: Tensor):
        grads, ctx.grads = ctx.grads, None  # backward runs once per graph: the buffers go to autograd
        if float(grad_output) != 1.0:  # a loss scale (fp16) or an outer factor
            grads = tuple(g.mul_(grad_output) if g is not None else None for g in grads)
        return (*grads, *([None] * (len(ctx.needs_input_grad) - 2)))


@dataclass
class CompanionHead:
    """A frozen companion model's side of the head loss for one micro-batch: its final-normed hidden states
    [n, its hidden] (in its dtype, computed without gradients), its output matrix restricted to the ids it
    shares with the student [shared, its hidden] (losses.shared_vocab: the 64 extra ids of a 262208 vocabulary
    are never computed), and its own soft-cap."""

    hidden: Tensor
    matrix: Tensor
    softcap: float | None

    def logits(self, part: slice) -> Tensor:
        """float32 soft-capped logits [chunk, shared] of the positions ``part``."""
        with torch.no_grad():
            return _soft_cap(_vocab_major_logits(self.matrix, self.hidden[part]), self.softcap)[0]


def _vocab_major_logits(matrix: Tensor, hidden: Tensor) -> Tensor:
    """float32 logits [c, vocab] of hidden states [c, dim], stored vocabulary-major (a transposed view of a
    [vocab, c] buffer). With 262k ids, ``matrix @ h.T`` and the head gradient ``d.T @ h`` read from that layout
    run near the square matmul rate on CPU BLAS, where ``h @ matrix.T`` runs at about 0.65 of it
    (benchmarks/results/train-profile-2026-12-02.md); the loss code sees ordinary [c, vocab] logits."""
    return (matrix @ hidden.T).float().T


def _soft_cap(logits: Tensor, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    if softcap is None:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


def _cross_entropy_and_grad(logits: Tensor, t: Tensor, w: Tensor, term: CrossEntropy, softcap: float | None,
                            needs_grad: bool) -> tuple[Tensor, Tensor | None]:
    """(loss sum, its weight not applied; d(weight * loss)/d(raw logits) or None) of one chunk's
    cross-entropy, the gradient written out in the logits' own buffer (see ChunkedHeadLoss)."""
    smoothing, vocab = term.label_smoothing, logits.shape[-1]
    logits, capped = _soft_cap(logits, softcap)
    lse = torch.logsumexp(logits, dim=-1)  # [c]
    nll = lse - logits.gather(-1, t[:, None])[:, 0]
    per_token = nll if smoothing == 0 else (1 - smoothing) * nll + smoothing * (lse - logits.mean(-1))
    loss = (per_token * w).sum()
    if not needs_grad:
        return loss, None
    d_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' buffer
    d_logits.scatter_add_(-1, t[:, None], torch.full_like(lse[:, None], -(1 - smoothing)))
    if smoothing:
        d_logits.sub_(smoothing / vocab)
    d_logits.mul_((w * term.weight)[:, None])
    if capped is not None:
        d_logits.mul_(1 - capped.square_())
    return loss, d_logits


def _is_cross_entropy_and_forward_kl(terms: tuple[HeadTerm, ...]) -> bool:
    return (len(terms) == 2 and isinstance(terms[0], CrossEntropy) and isinstance(terms[1], Distillation)
            and terms[1].divergence == "fkl")


def _cross_entropy_fkl_and_grad(logits: Tensor, t: Tensor, w: Tensor, ce: CrossEntropy, kd: Distillation,
                                teacher: Tensor, temperature: float, softcap: float | None,
                                needs_grad: bool) -> tuple[Tensor, Tensor | None]:
    """(the two terms' loss sums [2], their weights not applied; d(weighted sum)/d(raw logits) or None) of one
    chunk of cross-entropy plus forward KL from the teacher's chunk logits ``teacher`` [c, shared] (a fresh
    buffer, used in place). Autograd would keep about eight [c, vocab] float32 buffers for this chunk
    (benchmarks/distill.py measured 5 GB at 262k ids); written out it takes four. With p_s = softmax(z / T)
    and p_t = softmax(z_t / T) over the shared ids, d(s * KL(p_t || p_s))/dz = (s / T) (p_s - p_t), where s
    is T^2 under t2_scaling, else 1."""
    shared = teacher.shape[-1]
    scale = temperature**2 if kd.t2_scaling else 1.0
    z, capped = _soft_cap(logits, softcap)
    log_ps = z[:, :shared] / temperature  # a copy: z stays the cross-entropy's
    log_ps.sub_(torch.logsumexp(log_ps, dim=-1, keepdim=True))
    log_pt = teacher.div_(temperature)
    log_pt.sub_(torch.logsumexp(log_pt, dim=-1, keepdim=True))
    p_t = log_pt.exp()
    kl = log_pt.sub_(log_ps).mul_(p_t).sum(-1)  # sum p_t (log p_t - log p_s), in log_pt's buffer
    kd_sum = (scale * kl * w).sum()
    smoothing, vocab = ce.label_smoothing, z.shape[-1]
    lse = torch.logsumexp(z, dim=-1)  # [c]
    nll = lse - z.gather(-1, t[:, None])[:, 0]
    per_token = nll if smoothing == 0 else (1 - smoothing) * nll + smoothing * (lse - z.mean(-1))
    sums = torch.stack([(per_token * w).sum(), kd_sum])
    if not needs_grad:
        return sums, None
    d_logits = z.sub_(lse[:, None]).exp_()  # the cross-entropy's softmax, in z's buffer
    d_logits.scatter_add_(-1, t[:, None], torch.full_like(lse[:, None], -(1 - smoothing)))
    if smoothing:
        d_logits.sub_(smoothing / vocab)
    d_logits.mul_((w * ce.weight)[:, None])
    d_kl = log_ps.exp_().sub_(p_t).mul_((w * (kd.weight * scale / temperature))[:, None])  # in log_ps's buffer
    d_logits[:, :shared].add_(d_kl)
    if capped is not None:
        d_logits.mul_(1 - capped.square_())
    return sums, d_logits


def _terms_and_grad(logits: Tensor, t: Tensor, w: Tensor, terms: tuple[HeadTerm, ...], extras: Mapping[str, Tensor],
                    softcap: float | None, needs_grad: bool, companions: Mapping[str, Tensor],
                    scalars: Mapping[str, float]) -> tuple[Tensor, Tensor | None]:
    """(the terms' loss sums [terms], their weights not applied; d(weighted sum)/d(raw logits) or None) of
    one chunk under any head terms, by autograd on the chunk alone; ``companions`` are the companions'
    logits of the chunk (constants)."""
    with torch.enable_grad():
        raw = logits.requires_grad_(needs_grad)
        z, _ = _soft_cap(raw, softcap)
        sums = torch.stack([(head_term(term, z, t, extras, companions, scalars) * w).sum() for term in terms])
        if not needs_grad:
            return sums.detach(), None
        loss = sum(term.weight * value for term, value in zip(terms, sums, strict=True))
        (d_logits,) = torch.autograd.grad(loss, raw)
    return sums.detach(), d_logits


def chunked_head_loss(matrix: Tensor, hidden: Tensor, targets: Tensor, weights: Tensor, *, terms: tuple[HeadTerm, ...],
                      chunk_tokens: int, softcap: float | None = None, extras: Mapping[str, Tensor] | None = None,
                      companions: Mapping[str, CompanionHead] | None = None, scalars: Mapping[str, float] | None = None,
                      term_sums: list[Tensor] | None = None) -> Tensor:
    """sum(weights * head terms) of final hidden states [n, dim] against the output ``matrix`` [vocab, dim]
    (logits soft-capped at ``softcap`` when given), ``chunk_tokens`` positions at a time; ``extras`` are the
    terms' per-position inputs [n, ...], ``companions`` the frozen teachers the Distillation terms read,
    ``scalars`` the step's scalars. ``term_sums``, when given, receives the per-term sums [terms] (weights not
    applied)."""
    extras = dict(extras or {})
    total, sums = ChunkedHeadLoss.apply(hidden, matrix, targets, weights.float(), tuple(terms), chunk_tokens, softcap,
                                        dict(companions or {}), dict(scalars or {}), tuple(extras), *extras.values())
    if term_sums is not None:
        term_sums.append(sums)
    return total


# --- one micro-batch ------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """A checked micro-batch (gemmalab.train.inputs.StepInputs) as tensors on the model's device."""

    ids: Tensor  # int64 [batch, seq]
    targets: Tensor  # int64 [batch, seq]
    weights: Tensor  # float32 [batch, seq]
    positions: Tensor | None  # int64 [batch, seq], with masks
    masks: dict[str, Tensor] | None  # layer type -> bool [batch, 1, seq, seq]
    extras: dict[str, Tensor]  # float32; int64 for teacher ids
    hidden_layers: tuple[int, ...]
    attention_layers: tuple[int, ...]
    query_key_layers: tuple[int, ...] = ()
    scalars: dict[str, float] = field(default_factory=dict)
    companion_masks: dict[str, dict[str, Tensor]] | None = None  # like masks, per companion


def batch_arrays(model: Gemma3ForCausalLM, step: StepInputs) -> Batch:
    device = model.device

    def put(array: np.ndarray, dtype: torch.dtype) -> Tensor:
        array = np.ascontiguousarray(array)
        # a read-only array (a broadcast view of one row of positions) is copied: torch wants writable memory
        return torch.from_numpy(array if array.flags.writeable else array.copy()).to(device=device, dtype=dtype)

    def put_masks(per_type: dict[str, np.ndarray]) -> dict[str, Tensor]:
        return {kind: put(m[:, None], torch.bool) for kind, m in per_type.items()}

    masks = None if step.masks is None else put_masks(step.masks)
    companion_masks = None if step.companion_masks is None else {  # the student's when prepare shared them
        name: masks if per_type is step.masks else put_masks(per_type) for name, per_type in step.companion_masks.items()
    }
    return Batch(
        ids=put(step.inputs, torch.long), targets=put(step.targets, torch.long), weights=put(step.weights, torch.float32),
        positions=None if step.positions is None else put(step.positions, torch.long), masks=masks,
        extras={name: put(value, torch.long if np.issubdtype(value.dtype, np.integer) else torch.float32)
                for name, value in step.extras.items()},
        hidden_layers=step.hidden_layers, attention_layers=step.attention_layers,
        query_key_layers=step.query_key_layers, scalars=dict(step.scalars), companion_masks=companion_masks,
    )


def hidden_state(out: Gemma3Output, index: int) -> Tensor:
    """Hidden state ``index`` in transformers' convention: the residual stream after ``index`` blocks, the
    last one after the final norm."""
    return out.last_hidden_state if index == len(out.hidden_states) - 1 else out.hidden_states[index]


@dataclass
class CompanionCapture:
    """What a companion's backbone returned for one micro-batch, without gradients: the hidden states and
    the queries and keys the transfer terms read, by index."""

    hidden_states: dict[int, Tensor]
    queries_keys: dict[int, tuple[Tensor, Tensor]]


def run_companions(companions: Mapping[str, Gemma3ForCausalLM], batch: Batch, loss: LossSpec,
                   student_vocab: int) -> tuple[dict[str, CompanionHead], dict[str, CompanionCapture]]:
    """Each companion's backbone once on the batch's ids, positions and (its own) masks, without gradients,
    in its own dtype (outside any autocast: a bf16 teacher stays bf16, an fp32 one fp32): (the head side of
    each companion a Distillation term reads, its output matrix restricted to the shared ids; the captures
    of each companion a transfer term reads)."""
    heads, captures = {}, {}
    for name, companion in companions.items():
        masks = None if batch.companion_masks is None else batch.companion_masks[name]
        hidden_layers, qk_layers = loss.companion_hidden_layers(name), loss.companion_query_key_layers(name)
        with torch.no_grad(), torch.autocast(companion.device.type, enabled=False):
            out = companion.model(batch.ids, positions=batch.positions, mask=masks,
                                  output_hidden_states=bool(hidden_layers), output_queries_keys=qk_layers)
        if name in loss.head_companions:
            hidden = out.last_hidden_state
            shared = shared_vocab(student_vocab, companion.config.vocab_size)
            heads[name] = CompanionHead(hidden.reshape(-1, hidden.shape[-1]), companion.output_weight()[:shared],
                                        companion.config.final_logit_softcapping)
        if hidden_layers or qk_layers:
            captures[name] = CompanionCapture({i: hidden_state(out, i) for i in hidden_layers},
                                              {i: out.queries_keys[i] for i in qk_layers})
    return heads, captures


def hidden_transfer(student: Tensor, teacher: Tensor, metric: str, projection: Tensor | None) -> Tensor:
    """Per-position loss [batch, seq] of hidden states [batch, seq, Ds] and [batch, seq, Dt] in float32,
    through ``projection`` [Dt, Ds] when given (transfer.hidden_transfer has the formulas)."""
    h = student.float()
    if projection is not None:
        h = h @ projection.T  # [batch, seq, Dt]
    t = teacher.float()
    if metric == "mse":
        return (h - t).square().mean(-1)
    return 1 - (h * t).sum(-1) / (h.norm(dim=-1) * t.norm(dim=-1)).clamp_min(COSINE_EPS)


def _attention_rows(q: Tensor, k: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Attention probabilities [batch, heads, rows, keys] (float32) of queries [batch, heads, rows, d] over keys
    [batch, kv_heads, keys, d] (each shared by heads / kv_heads consecutive query heads) under a boolean mask
    [batch, 1, rows, keys]; ``scale`` is the layer's score scale over the attention temperature."""
    batch, heads, rows, d = q.shape
    kv_heads = k.shape[1]
    grouped = q.float().reshape(batch, kv_heads, heads // kv_heads, rows, d)  # [batch, kv, groups, rows, d]
    scores = torch.einsum("bkgrd,bksd->bkgrs", grouped, k.float()).reshape(batch, heads, rows, -1) * scale
    return torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)


def _attention_chunk_sum(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, mask_s: Tensor, mask_t: Tensor,
                         weights: Tensor, groups_s: Tensor, groups_t: Tensor, scale_s: float, scale_t: float) -> Tensor:
    """sum over one chunk of query rows of weights * mean over the common groups of KL(teacher || student)."""
    student = torch.einsum("gh,bhrs->bgrs", groups_s, _attention_rows(q_s, k_s, mask_s, scale_s))
    with torch.no_grad():
        teacher = torch.einsum("gh,bhrs->bgrs", groups_t, _attention_rows(q_t, k_t, mask_t & mask_s, scale_t))
    kl = (teacher * (teacher.clamp_min(LOG_FLOOR).log() - student.clamp_min(LOG_FLOOR).log())).sum(-1)  # [b, g, rows]
    return (kl.mean(1) * weights).sum()


def attention_transfer(term: AttentionTransfer, student: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor],
                       masks: tuple[Tensor, Tensor], weights: Tensor, scales: tuple[float, float],
                       groups: tuple[Tensor, Tensor]) -> Tensor:
    """The term's sum over positions (weights [batch, seq]), ``term.query_chunk`` query rows at a time: each
    chunk is recomputed in the backward pass rather than kept (torch.utils.checkpoint), so one chunk's
    [batch, heads, rows, keys] probabilities exist at a time. ``masks`` are the student's and the teacher's
    boolean [batch, 1, seq, seq] masks of the two blocks' layer types, ``scales`` their score scales."""
    (q_s, k_s), (q_t, k_t) = student, teacher
    scale_s, scale_t = (scale / term.temperature for scale in scales)
    total = q_s.new_zeros((), dtype=torch.float32)
    for start in range(0, q_s.shape[2], term.query_chunk):
        rows = slice(start, start + term.query_chunk)
        total = total + checkpoint(
            _attention_chunk_sum, q_s[:, :, rows], k_s, q_t[:, :, rows], k_t, masks[0][:, :, rows], masks[1][:, :, rows],
            weights[:, rows], *groups, scale_s, scale_t, use_reentrant=False,
        )
    return total


def transfer_sum(term: TransferTerm, model: Gemma3ForCausalLM, out: Gemma3Output, batch: Batch,
                 companion: Gemma3ForCausalLM, captured: CompanionCapture, loss_parameters: Mapping[str, Tensor]) -> Tensor:
    """One transfer term's sum over positions of weight * its per-position loss (its own weight not applied)."""
    if isinstance(term, AttentionTransfer):
        student, teacher = model.config, companion.config
        masks = (batch.masks[student.layer_types[term.student_layer]],
                 batch.companion_masks[term.teacher][teacher.layer_types[term.teacher_layer]])
        groups = tuple(torch.from_numpy(g).to(batch.weights.device)
                       for g in head_groups(student.num_attention_heads, student.num_key_value_heads,
                                            teacher.num_attention_heads, teacher.num_key_value_heads))
        return attention_transfer(term, out.queries_keys[term.student_layer], captured.queries_keys[term.teacher_layer],
                                  masks, batch.weights, (student.attention_scale, teacher.attention_scale), groups)
    projection = None if term.projection is None else loss_parameters[term.projection]
    per_position = hidden_transfer(hidden_state(out, term.student_layer), captured.hidden_states[term.teacher_layer],
                                   term.metric, projection)
    return (per_position * batch.weights).sum()


def chunked_loss_sum(model: Gemma3ForCausalLM, batch: Batch, loss: LossSpec, *, chunk_tokens: int,
                     companions: Mapping[str, Gemma3ForCausalLM] | None = None,
                     loss_parameters: Mapping[str, Tensor] | None = None,
                     term_sums: list[Tensor] | None = None) -> Tensor:
    """The backbone once (capturing what the aux and transfer terms read), then the head terms in chunks
    (chunked_head_loss), plus the weighted aux and transfer terms: the whole loss sum of ``loss``.
    ``companions`` are the frozen models the Distillation and transfer terms read, ``loss_parameters`` the
    projections; ``term_sums``, when given, receives the per-term sums (the head's [head terms], then one
    0-d tensor per aux and transfer term; weights not applied)."""
    out = model.model(batch.ids, positions=batch.positions, mask=batch.masks,
                      output_hidden_states=bool(batch.hidden_layers),
                      output_attentions=frozenset(batch.attention_layers), output_queries_keys=batch.query_key_layers)
    hidden = out.last_hidden_state  # [batch, seq, dim]
    dim = hidden.shape[-1]
    rows = hidden.shape[0] * hidden.shape[1]
    head_extras = {name: batch.extras[name].reshape(rows, *batch.extras[name].shape[2:]) for name in loss.head_extras}
    companions = companions or {}
    heads, captures = run_companions(companions, batch, loss, model.config.vocab_size) if loss.companions else ({}, {})
    total = chunked_head_loss(model.output_weight(), hidden.reshape(-1, dim), batch.targets.reshape(-1),
                              batch.weights.reshape(-1), terms=loss.head, chunk_tokens=chunk_tokens,
                              softcap=model.config.final_logit_softcapping, extras=head_extras, companions=heads,
                              scalars=batch.scalars, term_sums=term_sums)
    sums = [(term, (aux_term(term, hidden_state(out, term.layer) if isinstance(term, HiddenStateMSE)
                             else out.attentions[term.layer], batch.extras[term.targets]) * batch.weights).sum())
            for term in loss.aux]
    sums += [(term, transfer_sum(term, model, out, batch, companions[term.teacher], captures[term.teacher],
                                 loss_parameters or {})) for term in loss.transfer]
    for term, term_sum in sums:
        if term_sums is not None:
            term_sums.append(term_sum.detach()[None])
        total = total + term.weight * term_sum
    return total


class Adafactor(torch.optim.Optimizer):
    """spec.py's Adafactor: factored second moments over the last two axes, update clipping, parameter
    scaling, explicit learning rate, optional first moment, decoupled weight decay."""

    def __init__(self, params, *, lr: float, decay_rate: float, clip_threshold: float, eps: tuple[float, float],
                 beta1: float | None, weight_decay: float):
        defaults = dict(lr=lr, decay_rate=decay_rate, clip_threshold=clip_threshold, eps=eps, beta1=beta1,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002 (the Optimizer signature)
        for group in self.param_groups:
            eps1, eps2 = group["eps"]
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    if g.ndim >= 2:
                        state["exp_avg_sq_row"] = torch.zeros(g.shape[:-1], dtype=torch.float32, device=g.device)
                        state["exp_avg_sq_col"] = torch.zeros(g.shape[:-2] + g.shape[-1:], dtype=torch.float32,
                                                              device=g.device)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(g, dtype=torch.float32)
                    if group["beta1"] is not None:
                        state["exp_avg"] = torch.zeros_like(g, dtype=torch.float32)
                state["step"] += 1
                t = float(state["step"])
                beta2 = 1.0 - t ** (-group["decay_rate"])
                squared = g.square() + eps1  # [..., rows, cols]
                if g.ndim >= 2:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.mul_(beta2).add_(squared.mean(dim=-1), alpha=1 - beta2)  # [..., rows]
                    col.mul_(beta2).add_(squared.mean(dim=-2), alpha=1 - beta2)  # [..., cols]
                    variance = row[..., :, None] * col[..., None, :] / row.mean(dim=-1)[..., None, None]
                else:
                    state["exp_avg_sq"].mul_(beta2).add_(squared, alpha=1 - beta2)
                    variance = state["exp_avg_sq"]
                update = g * variance.rsqrt()
                update.div_(max(1.0, _rms(update) / group["clip_threshold"]))
                if group["beta1"] is not None:
                    update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
                step_size = lr * max(eps2, _rms(p))  # the parameter's scale before this update
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-step_size)


def _rms(x: Tensor) -> float:
    return float(x.float().square().mean().sqrt())


def frozen_companions(model: Gemma3ForCausalLM, loss: LossSpec,
                      companions: Mapping[str, Gemma3ForCausalLM] | None) -> dict[str, Gemma3ForCausalLM]:
    """The companion models the loss reads (checked by spec.check_companions), frozen: in eval mode, their
    parameters without requires_grad, so autograd never records them (they also run under no_grad)."""
    companions = dict(companions or {})
    for name, companion in companions.items():
        if not isinstance(companion, Gemma3ForCausalLM):
            raise InputError(f"companion {name!r} is a {type(companion).__name__}, not a model of this backend: "
                             "build it with the same backend's build(...)")
        if companion is model:
            raise InputError(f"companion {name!r} is the model being trained: a companion is frozen, so build a "
                             "separate copy (backend.build(config, backend.weights(model), dtype=...))")
        if companion.device != model.device:
            raise InputError(f"companion {name!r} is on {companion.device}, the student on {model.device}: build both "
                             "on one device")
    check_companions(loss, model.config, {name: c.config for name, c in companions.items()})
    for companion in companions.values():
        companion.eval()
        companion.requires_grad_(False)
    return companions


class Trainer:
    """gemmalab.train.spec.BackendTrainer for a float32 model.Gemma3ForCausalLM, with frozen ``companions``
    (name -> a model of any dtype built by this backend) for the loss's Distillation and transfer terms, and
    the loss's own trainable parameters (its projections) from ``loss_parameters`` (name -> numpy; None =
    fresh ones, transfer.checked_loss_parameters)."""

    def __init__(self, model: Gemma3ForCausalLM, spec: TrainSpec,
                 companions: Mapping[str, Gemma3ForCausalLM] | None = None,
                 loss_parameters: Mapping[str, np.ndarray] | None = None):
        if model.dtype != torch.float32:
            raise InputError(f"training needs the model in float32 (master weights), got {model.dtype}: "
                             "build it with dtype='float32' and choose the compute precision in the spec")
        self.model, self.spec = model, spec
        self.companions = frozen_companions(model, spec.loss, companions)
        self.term_names = spec.loss.term_names()
        self._term_sums: list[Tensor] = []  # of the last accumulate
        self.model.model.gradient_checkpointing = spec.grad_checkpointing
        start = checked_loss_parameters(spec.loss, model.config, {n: c.config for n, c in self.companions.items()},
                                        loss_parameters)
        # Outside the model (never in its state_dict or checkpoint), trained by the same optimizer.
        self.loss_params = {name: torch.nn.Parameter(torch.from_numpy(value.copy()).to(model.device))
                            for name, value in start.items()}
        # canonical names (the tied head appears once), then the loss's parameters
        self.params = {**dict(model.named_parameters()), **self.loss_params}
        self.scales: dict[str, float] = {}
        self.set_lr_scales({})  # everything trains (built models hold their weights without gradients)
        # One parameter group per tensor, so each can carry its own learning rate (layer-wise scales).
        groups = [{"params": [p], "name": n} for n, p in self.params.items()]
        opt = spec.optimizer
        if opt.name == "adamw":
            # torch's fused kernel: one pass over each tensor, where the single-tensor loop makes temporaries the
            # size of the parameter (the embedding's are 671 MB at 262k ids). On the 270M step it took the
            # update from 1.96 s to 0.75-1.0 s (benchmarks/results/train-profile-2026-12-02.md); same formula,
            # rounding differs by about 1 ulp of a step.
            self.fused = model.device.type in FUSED_ADAMW_DEVICES
            self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=opt.betas, eps=opt.eps,
                                               weight_decay=opt.weight_decay, fused=self.fused or None,
                                               foreach=None if self.fused else False)
        else:
            self.fused = False
            self.optimizer = Adafactor(groups, lr=0.0, decay_rate=opt.decay_rate, clip_threshold=opt.clip_threshold,
                                       eps=opt.eps_adafactor, beta1=opt.beta1, weight_decay=opt.weight_decay)

    def _autocast(self):
        dtype = AUTOCAST.get(self.spec.precision)
        return torch.autocast(self.model.device.type, dtype=dtype, enabled=dtype is not None)

    def accumulate(self, inputs, targets, weights, *, positions=None, mask=None, extras=None, scalars=None,
                   loss_scale: float = 1.0) -> float:
        step = prepare(self.model.config, self.spec.loss, inputs, targets, weights, positions=positions, mask=mask,
                       extras=extras, scalars=scalars,
                       companions={name: c.config for name, c in self.companions.items()})
        batch = batch_arrays(self.model, step)
        self._term_sums = []
        self.model.train()  # training mode in the step only (adapter dropout), so evaluations between steps see none
        try:
            with self._autocast():
                loss = chunked_loss_sum(self.model, batch, self.spec.loss, chunk_tokens=self.spec.loss_chunk_tokens,
                                        companions=self.companions, loss_parameters=self.loss_params,
                                        term_sums=self._term_sums)
            (loss * loss_scale).backward()  # .grad of each trainable parameter sums over micro-batches
        finally:
            self.model.eval()
        return float(loss.detach())

    def term_sums(self) -> dict[str, float]:
        if not self._term_sums:
            return {}
        return dict(zip(self.term_names, torch.cat(self._term_sums).tolist(), strict=True))

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.params.items() if p.requires_grad and p.grad is not None]

    def gradients(self) -> dict[str, np.ndarray]:
        return {n: p.grad.detach().cpu().numpy().copy() for n, p in self._trainable()}

    def loss_parameters(self) -> dict[str, np.ndarray]:
        return {name: p.detach().cpu().numpy().copy() for name, p in self.loss_params.items()}

    def apply(self, lr: float, normalizer: float) -> dict[str, float]:
        trainable = self._trainable()
        grads = [p.grad for _, p in trainable]
        # The norm of the summed gradients over the normalizer, then one in-place pass that applies both the
        # normalizer and the clip (one read and write of every gradient, not two).
        norm = float(torch.nn.utils.get_total_norm(grads)) / normalizer if grads else 0.0
        if math.isfinite(norm):
            factor = 1.0 if self.spec.max_grad_norm is None else min(1.0, self.spec.max_grad_norm / (norm + 1e-6))
            if grads:  # the foreach kernel refuses an empty list (everything frozen)
                torch._foreach_mul_(grads, factor / normalizer)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * self.scales[group["name"]]
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm}

    def set_lr_scales(self, scales: Mapping[str, float]) -> None:
        for name, param in self.params.items():
            self.scales[name] = float(scales.get(name, 1.0))
            param.requires_grad_(self.scales[name] != 0.0)  # frozen: no gradient, so no update or decay

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The canonical state of gemmalab/train/spec.py. Its names are torch's own (torch.optim.AdamW's, and
        the Adafactor above keeps them too); only the step changes form: torch counts in a float32 0-d
        tensor, the canonical step is int64 [1]."""
        out = {}
        for group in self.optimizer.param_groups:
            for key, value in self.optimizer.state.get(group["params"][0], {}).items():
                array = value.detach().cpu().numpy()
                out[f"{key}/{group['name']}"] = np.array([int(array)], np.int64) if key == "step" else array.copy()
        return out

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a canonical state, written by any backend (checked by spec.check_optimizer_state)."""
        shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        checked = check_optimizer_state(state, self.spec.optimizer, shapes)
        self.optimizer.state.clear()
        for name, values in checked.items():
            device = self.params[name].device
            # torch keeps step counts as float32 (exact for any count below 2^24): on the CPU for the
            # single-tensor loop (a device tensor would cost a sync per step), on the parameter's device for the
            # fused kernel, which reads it there
            step_device = device if self.fused else "cpu"
            self.optimizer.state[self.params[name]] = {
                kind: torch.tensor(float(value[0]), dtype=torch.float32, device=step_device) if kind == "step"
                else torch.from_numpy(np.array(value)).to(device)
                for kind, value in values.items()
            }


__all__ = ["Adafactor", "ChunkedHeadLoss", "Batch", "CompanionHead", "Trainer", "aux_term", "batch_arrays",
           "cached_distillation", "chunked_head_loss", "chunked_loss_sum", "CompanionCapture", "cross_entropy", "divergence",
           "frozen_companions", "head_term", "hidden_state", "hidden_transfer", "run_companions",
           "soft_target_cross_entropy", "transfer_sum", "attention_transfer"]
