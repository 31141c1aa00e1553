"""Samplers: the decision rule that turns next-token logits into token ids, as plain callables.

They work on numpy float32 logits of the positions being decoded, [batch, vocab], which every backend
returns, so one implementation serves MLX, PyTorch and JAX alike and the same seed gives the same tokens on
each. Greedy decoding is an argmax; sampling applies, in order (the order transformers uses):

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw from what is left

Each filter is a function of its own (``top_k_filter`` ...) returning logits with the removed tokens set to
-inf, so what it keeps can be checked on hand-made logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError

Sampler = Callable[[np.ndarray, Sequence[Sequence[int]]], np.ndarray]
"""(logits [batch, vocab], token history per row) -> next ids [batch]."""


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=-1, keepdims=True)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits of each row (ties at the k-th value are kept too)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[..., -k, None]  # the k-th largest value per row
    return np.where(logits >= kth, logits, -np.inf)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus: keep the smallest set of most likely tokens whose probabilities sum to at least p."""
    if p >= 1.0:
        return logits
    probs = softmax(logits)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # probability of the tokens ranked higher
    keep_sorted = mass_before < p  # the token that crosses p is kept; the most likely one always is
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep, logits, -np.inf)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep tokens whose probability is at least ``min_p`` times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = softmax(logits)
    threshold = min_p * probs.max(axis=-1, keepdims=True)
    return np.where(probs >= threshold, logits, -np.inf)


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[Sequence[int]], penalty: float) -> np.ndarray:
    """CTRL's penalty (as transformers applies it): a token already in the row's history has its logit
    divided by ``penalty`` when positive and multiplied by it when negative."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    for row, seen in enumerate(history):
        if len(seen):
            ids = np.unique(np.asarray(seen, dtype=np.int64))
            values = out[row, ids]
            out[row, ids] = np.where(values > 0, values / penalty, values * penalty)
    return out


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InputError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise InputError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if not 0.0 <= self.min_p < 1.0:
            raise InputError(f"min_p={self.min_p} must be in [0, 1) (0 = off)")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")


def filtered_logits(logits: np.ndarray, history: Sequence[Sequence[int]], params: SamplingParams) -> np.ndarray:
    """The logits sampling draws from: penalty, temperature and the three filters applied in order."""
    out = apply_repetition_penalty(np.asarray(logits, dtype=np.float32), history, params.repetition_penalty)
    if params.temperature > 0:
        out = out / params.temperature
    out = top_k_filter(out, params.top_k)
    out = top_p_filter(out, params.top_p)
    return min_p_filter(out, params.min_p)


def make_sampler(params: SamplingParams | None = None) -> Sampler:
    """A sampler for ``params``: greedy when temperature is 0, else a seeded random draw.

    The random generator lives in the returned callable, so one sampler used for one generation gives the
    same tokens for the same seed.
    """
    params = params or SamplingParams()
    rng = np.random.default_rng(params.seed)

    def sample(logits: np.ndarray, history: Sequence[Sequence[int]]) -> np.ndarray:
        if params.temperature == 0:
            return np.argmax(apply_repetition_penalty(logits, history, params.repetition_penalty), axis=-1)
        probs = softmax(filtered_logits(logits, history, params).astype(np.float64))
        # Inverse-CDF draw per row: one uniform number per row, so the stream of random numbers (and thus
        # the tokens) depends only on the seed and the batch, not on the vocabulary's layout.
        cdf = np.cumsum(probs, axis=-1)
        u = rng.random((probs.shape[0], 1)) * cdf[:, -1:]
        return np.minimum((cdf < u).sum(axis=-1), probs.shape[-1] - 1)

    return sample
