"""Sparse teacher targets for distillation, and the estimators a student's loss computes from them.

An offline teacher cache (gemmalab.distill.cache) cannot keep a 262k-id distribution per position, so it
keeps k ids of it. This module decides which, and defines what a student's loss makes of them: it is numpy
only, the reference each backend's trainer term is tested against.

Notation, per position: teacher logits t and student logits z over a vocabulary of V ids, a temperature T,
p = softmax(t / T) and q = softmax(z / T).

Top-k targets (``top_k_targets``): the set S of the k ids of largest p (ties to the smaller id), sorted by
descending probability, their log p_i, and the tail mass the cache does not keep

    r = 1 - sum_{i in S} p_i = exp(logsumexp_{i not in S} t_i / T - logsumexp_i t_i / T)  (>= 0)

computed through the second form, which cannot go negative or lose the small tails to cancellation.

Sparse KL (``sparse_kl``): the KL divergence of the two distributions lumped into k + 1 buckets, the k
kept ids and one "rest" bucket (r on the teacher's side, q_rest on the student's):

    KL_S(p || q) = sum_{i in S} p_i (log p_i - log q_i) + r (log r - log q_rest),  q_rest = 1 - sum_{i in S} q_i

with 0 log 0 = 0. Lumping never adds information, so KL_S <= KL(p || q); with k = V it is the full forward
KL (S is the vocabulary and r = 0). No T^2 factor: scaling the loss is the trainer's decision.

Sampled targets (``sampled_targets``, the unbiased variant of the Gemma 3 report): k ids j_1 .. j_k drawn
with replacement from p, with their log p_j. They have no tail (``tail`` is NaN, which ``sparse_kl``
refuses). The sampled cross-entropy (``sampled_cross_entropy``)

    CE_k(p, q) = -(1/k) sum_{m=1..k} log q_{j_m}

is an unbiased Monte-Carlo estimate of H(p, q) = -sum_i p_i log q_i = KL(p || q) + H(p). H(p) does not
depend on the student, so CE_k's gradient in z is an unbiased estimate of the forward KL's.

Memory: the functions work through the rows (positions) a block at a time in float64, so a chunk of
[positions, 262144] logits needs a few blocks' worth of temporaries, not copies of the whole chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..checks import is_count
from ..errors import InputError

# Entries (rows x vocabulary) per float64 working block: 128 MB, 64 positions at Gemma's 262k vocabulary.
BLOCK_ENTRIES = 1 << 24
# Keeps the sampling streams apart from every other stream seeded from the run's seed (data order, init).
SAMPLING_SALT = 0x5A3D


@dataclass(frozen=True)
class SparseTargets:
    """What the teacher cache keeps of each position's distribution p (at the cache's temperature).

    ``ids`` int32 [..., k]: top-k ids (distinct, by descending p) or k sampled ids (with repeats);
    ``logprobs`` float32 [..., k]: log p of each id;
    ``tail`` float32 [...]: 1 - sum p of the kept ids for top-k targets; NaN for sampled ones (no tail)."""

    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    @property
    def sampled(self) -> bool:
        """Sampled ids (no tail mass), as opposed to top-k ones."""
        return bool(self.tail.size) and bool(np.isnan(self.tail).all())


def window_rng(seed: int, window: int) -> np.random.Generator:
    """The sampling generator of one packed window: derived from (seed, window index) alone, so a rebuilt
    or resumed cache draws the same ids whatever the batch, shard or chunk sizes."""
    if not (is_count(seed) and seed >= 0 and is_count(window) and window >= 0):
        raise InputError(f"seed and window must be non-negative integers, got {seed!r} and {window!r}")
    return np.random.default_rng([SAMPLING_SALT, int(seed), int(window)])


# ---------------------------------------------------------------------------------------------------------
# Checks and numerics shared by the functions below
# ---------------------------------------------------------------------------------------------------------
def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float | np.floating):
        raise InputError(f"temperature must be a number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature must be a positive finite number, got {temperature}: pass e.g. 1.0")
    return float(temperature)


def _check_logits(logits: np.ndarray, name: str = "logits") -> np.ndarray:
    array = np.asarray(logits)
    if array.ndim < 1 or array.shape[-1] < 1 or not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{name} must be a float array [..., vocab], got {array.dtype} {array.shape}")
    return array


def _check_k(k: int, vocab: int) -> int:
    if not is_count(k) or not 1 <= k <= vocab:
        raise InputError(f"k must be an integer in [1, {vocab}] (the vocabulary), got {k!r}")
    return int(k)


def _row_blocks(rows: int, vocab: int) -> range:
    """Starts of the row blocks that keep a float64 working copy near BLOCK_ENTRIES entries."""
    return range(0, rows, max(1, BLOCK_ENTRIES // vocab))


def _scaled_block(rows: np.ndarray, temperature: float) -> np.ndarray:
    """float64 logits / T of a block of rows, refused when not finite (an overflowed teacher)."""
    block = rows.astype(np.float64) / temperature
    if not np.isfinite(block).all():
        raise InputError("logits hold non-finite values (inf or NaN): the model overflowed; compute it in float32")
    return block


def logsumexp(x: np.ndarray) -> np.ndarray:
    """log sum exp over the last axis, stably (max-shifted); -inf for a row that is all -inf."""
    top = np.max(x, axis=-1, keepdims=True)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):  # an all -inf row sums to 0: log 0 = -inf is the answer
        return np.log(np.sum(np.exp(x - shift), axis=-1)) + shift[..., 0]


def _top_ids(scaled: np.ndarray, k: int) -> np.ndarray:
    """int64 [rows, k]: per row the ids of the k largest values, by descending value, ties to the smaller id.

    argpartition finds the k largest in O(V) but breaks ties at the k-th value arbitrarily; the rows where
    more ids than k reach that value (rare for float logits) are redone exactly, one by one."""
    vocab = scaled.shape[-1]
    if k == vocab:
        return np.argsort(-scaled, axis=-1, kind="stable")
    picked = np.argpartition(-scaled, k - 1, axis=-1)[:, :k]  # [rows, k], unordered
    threshold = np.take_along_axis(scaled, picked, axis=-1).min(axis=-1)  # the k-th largest value
    reaching = (scaled >= threshold[:, None]).sum(axis=-1)
    for row in np.flatnonzero(reaching > k):
        candidates = np.flatnonzero(scaled[row] >= threshold[row])  # ascending ids
        picked[row] = candidates[np.argsort(-scaled[row, candidates], kind="stable")[:k]]
    values = np.take_along_axis(scaled, picked, axis=-1)
    order = np.lexsort((picked, -values), axis=-1)  # by descending value, then ascending id
    return np.take_along_axis(picked, order, axis=-1)


# ---------------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------------
def top_k_targets(logits: np.ndarray, k: int, temperature: float = 1.0) -> SparseTargets:
    """The k most probable ids of softmax(logits / T) per position, with their log-probabilities (over the
    whole vocabulary) and the tail mass left out (module docstring). ``logits`` [..., vocab]."""
    logits = _check_logits(logits)
    vocab = logits.shape[-1]
    k, temperature = _check_k(k, vocab), _check_temperature(temperature)
    rows = logits.reshape(-1, vocab)
    ids = np.empty((len(rows), k), np.int32)
    logprobs = np.empty((len(rows), k), np.float32)
    tail = np.empty(len(rows), np.float32)
    for start in _row_blocks(len(rows), vocab):
        stop = start + max(1, BLOCK_ENTRIES // vocab)
        scaled = _scaled_block(rows[start:stop], temperature)  # [n, vocab] float64
        total = logsumexp(scaled)  # [n]
        picked = _top_ids(scaled, k)  # [n, k]
        kept = np.take_along_axis(scaled, picked, axis=-1)
        np.put_along_axis(scaled, picked, -np.inf, axis=-1)  # what is left is the tail
        ids[start:stop] = picked
        logprobs[start:stop] = kept - total[:, None]
        tail[start:stop] = np.exp(logsumexp(scaled) - total)  # exp(-inf) = 0 when k = vocab
    lead = logits.shape[:-1]
    return SparseTargets(ids.reshape(*lead, k), logprobs.reshape(*lead, k), tail.reshape(lead))


def sampled_targets(logits: np.ndarray, k: int, temperature: float, rng: np.random.Generator) -> SparseTargets:
    """k ids per position drawn with replacement from softmax(logits / T), with their log-probabilities;
    ``tail`` is NaN (sampled targets have no tail mass). ``logits`` [..., vocab].

    ``rng`` (window_rng(seed, window) in the cache) gives k uniforms per position, in position order, read by
    inverse CDF: calling this on consecutive blocks of one window's positions with one generator draws the
    same ids as one call on all of them."""
    logits = _check_logits(logits)
    vocab = logits.shape[-1]
    k, temperature = _check_k(k, vocab), _check_temperature(temperature)
    rows = logits.reshape(-1, vocab)
    uniforms = rng.random((len(rows), k))  # [rows, k] in [0, 1)
    ids = np.empty((len(rows), k), np.int32)
    logprobs = np.empty((len(rows), k), np.float32)
    for start in _row_blocks(len(rows), vocab):
        stop = start + max(1, BLOCK_ENTRIES // vocab)
        scaled = _scaled_block(rows[start:stop], temperature)
        log_p = scaled - logsumexp(scaled)[:, None]  # [n, vocab]
        cdf = np.cumsum(np.exp(log_p), axis=-1)
        for row in range(len(cdf)):
            # the first id whose cumulative mass exceeds u * total: an id of zero probability is never drawn
            drawn = np.searchsorted(cdf[row], uniforms[start + row] * cdf[row, -1], side="right")
            ids[start + row] = np.minimum(drawn, vocab - 1)
        logprobs[start:stop] = np.take_along_axis(log_p, ids[start:stop].astype(np.int64), axis=-1)
    lead = logits.shape[:-1]
    tail = np.full(lead, np.nan, np.float32)
    return SparseTargets(ids.reshape(*lead, k), logprobs.reshape(*lead, k), tail)


# ---------------------------------------------------------------------------------------------------------
# Estimators (the reference definitions of the trainer's sparse distillation terms)
# ---------------------------------------------------------------------------------------------------------
def _student_rows(student_logits: np.ndarray, targets: SparseTargets) -> tuple[np.ndarray, np.ndarray]:
    """(student logits [rows, vocab], target ids int64 [rows, k]) once their leading shapes agree."""
    student_logits = _check_logits(student_logits, "student logits")
    if student_logits.shape[:-1] != targets.ids.shape[:-1]:
        raise InputError(
            f"student logits {student_logits.shape} and sparse targets {targets.ids.shape} cover different "
            "positions: give the logits of the positions the targets were made for"
        )
    vocab = student_logits.shape[-1]
    ids = np.asarray(targets.ids, np.int64).reshape(-1, targets.k)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise InputError(f"target ids reach {int(ids.max())}, outside the student's vocabulary of {vocab}")
    return student_logits.reshape(-1, vocab), ids


def sparse_kl(student_logits: np.ndarray, targets: SparseTargets, temperature: float = 1.0) -> np.ndarray:
    """float64 [...]: KL over the k + 1 buckets (the kept ids and the rest) of the teacher's top-k targets
    against softmax(student_logits / T) (module docstring). Equals the full forward KL when k = vocabulary."""
    temperature = _check_temperature(temperature)
    if targets.sampled:
        raise InputError("sampled targets have no tail mass, which the sparse KL needs: use sampled_cross_entropy")
    rows, ids = _student_rows(student_logits, targets)
    log_p = np.asarray(targets.logprobs, np.float64).reshape(ids.shape)
    rest_p = np.asarray(targets.tail, np.float64).reshape(-1)
    out = np.empty(len(rows))
    for start in _row_blocks(len(rows), rows.shape[-1]):
        stop = start + max(1, BLOCK_ENTRIES // rows.shape[-1])
        scaled = rows[start:stop].astype(np.float64) / temperature
        total = logsumexp(scaled)
        log_q = np.take_along_axis(scaled, ids[start:stop], axis=-1) - total[:, None]  # [n, k]
        np.put_along_axis(scaled, ids[start:stop], -np.inf, axis=-1)
        log_q_rest = logsumexp(scaled) - total  # log(1 - sum q_kept), stably
        p, r = np.exp(log_p[start:stop]), rest_p[start:stop]
        kept = np.sum(p * (log_p[start:stop] - log_q), axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 log 0 = 0: the where picks 0 for r = 0
            rest = np.where(r > 0, r * (np.log(r) - log_q_rest), 0.0)
        out[start:stop] = kept + rest
    return out.reshape(targets.ids.shape[:-1])


def sampled_cross_entropy(student_logits: np.ndarray, targets: SparseTargets, temperature: float = 1.0) -> np.ndarray:
    """float64 [...]: -(1/k) sum_j log softmax(student_logits / T)[id_j], the unbiased Monte-Carlo estimate
    of the cross-entropy H(p_teacher, p_student) from k ids sampled from the teacher (module docstring)."""
    temperature = _check_temperature(temperature)
    rows, ids = _student_rows(student_logits, targets)
    out = np.empty(len(rows))
    for start in _row_blocks(len(rows), rows.shape[-1]):
        stop = start + max(1, BLOCK_ENTRIES // rows.shape[-1])
        scaled = rows[start:stop].astype(np.float64) / temperature
        log_q = np.take_along_axis(scaled, ids[start:stop], axis=-1) - logsumexp(scaled)[:, None]
        out[start:stop] = -log_q.mean(axis=-1)
    return out.reshape(targets.ids.shape[:-1])


__all__ = [
    "SparseTargets",
    "logsumexp",
    "sampled_cross_entropy",
    "sampled_targets",
    "sparse_kl",
    "top_k_targets",
    "window_rng",
]
