"""Held-out figures of a distillation run, in numpy from the two models' logits: the teacher's perplexity, the
student's top-1 agreement with the teacher and KL(teacher || student) at temperature 1; and from the two
models' captures, per mapped layer pair (gemmalab.distill.mapping), the cosine similarity of the hidden states
(the student's through its projection when the run trains one) and the attention KL at temperature 1
(gemmalab.train.transfer has both definitions).

Sums over weighted positions are kept apart from the figures, so batches and rows add up exactly and the
figures are per token of the whole held-out set. Agreement and KL are taken over the shared vocabulary
(gemmalab.train.losses.shared_vocab: a 262208-word teacher against a 262144-word student), the teacher's
distribution renormalised over it -- the distribution the student is trained to match; the teacher's
perplexity is over its whole vocabulary, as it would report it alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..train.losses import cross_entropy, divergence, perplexity_from_loss, restrict, shared_vocab
from ..train.transfer import attention_transfer, hidden_transfer
from .mapping import LayerPair


@dataclass(frozen=True)
class HeldOutSums:
    """Weighted sums over held-out positions (weight = the position's loss weight)."""

    tokens: float = 0.0
    teacher_nll: float = 0.0
    agreements: float = 0.0
    kl: float = 0.0

    def __add__(self, other: HeldOutSums) -> HeldOutSums:
        return HeldOutSums(self.tokens + other.tokens, self.teacher_nll + other.teacher_nll,
                           self.agreements + other.agreements, self.kl + other.kl)


def held_out_sums(student_logits: np.ndarray, teacher_logits: np.ndarray, targets: np.ndarray,
                  weights: np.ndarray) -> HeldOutSums:
    """The sums of one row (or batch): logits [..., vocab] of each model, targets and weights [...]."""
    w = np.asarray(weights, np.float64)
    shared = shared_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    student, teacher = restrict(student_logits, shared), restrict(teacher_logits, shared)
    agree = (student.argmax(-1) == teacher.argmax(-1)).astype(np.float64)
    kl = divergence(student, teacher, "fkl", temperature=1.0, t2_scaling=False)
    return HeldOutSums(
        tokens=float(w.sum()),
        teacher_nll=float((w * cross_entropy(teacher_logits, targets)).sum()),
        agreements=float((w * agree).sum()),
        kl=float((w * kl).sum()),
    )


def figures(sums: HeldOutSums) -> dict[str, float]:
    """Per-token figures, named as the evaluation records carry them (nothing when no token was held out)."""
    if sums.tokens <= 0:
        return {}
    teacher_loss = sums.teacher_nll / sums.tokens
    return {
        "eval_teacher_loss": teacher_loss,
        "eval_teacher_perplexity": perplexity_from_loss(teacher_loss),
        "eval_top1_agreement": sums.agreements / sums.tokens,
        "eval_kl": sums.kl / sums.tokens,
    }


@dataclass(frozen=True)
class LayerSums:
    """Weighted sums over held-out positions, per mapped pair (keyed by the student block): cosine similarity
    (absent for a pair whose widths differ with no projection to bridge them) and attention KL."""

    tokens: float = 0.0
    cosine: tuple[tuple[int, float], ...] = ()
    attention_kl: tuple[tuple[int, float], ...] = ()

    def __add__(self, other: LayerSums) -> LayerSums:
        if not self.tokens:
            return other
        return LayerSums(self.tokens + other.tokens, _add(self.cosine, other.cosine),
                         _add(self.attention_kl, other.attention_kl))


def _add(a: tuple[tuple[int, float], ...], b: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
    return tuple((layer, x + y) for (layer, x), (_, y) in zip(a, b, strict=True))


def layer_sums(pairs: list[LayerPair], student: dict[str, dict], teacher: dict[str, dict], weights: np.ndarray,
               projections: dict[str, np.ndarray], groups: tuple[np.ndarray, np.ndarray],
               projection_of) -> LayerSums:
    """The sums of one batch: ``student`` and ``teacher`` hold each model's captured ``hidden_states`` (by
    transformers' index) and ``attentions`` (by block), numpy; ``projection_of(student block)`` names the
    pair's projection (or None), looked up in ``projections``."""
    w = np.asarray(weights, np.float64)
    cosine, kl = [], []
    for pair in pairs:
        s, t = pair.student_layer, pair.teacher_layer
        h_s, h_t = student["hidden_states"][s + 1], teacher["hidden_states"][t + 1]
        projection = projections.get(projection_of(s) or "")
        if projection is not None or h_s.shape[-1] == h_t.shape[-1]:
            cosine.append((s, float((w * (1.0 - hidden_transfer(h_s, h_t, "cosine", projection))).sum())))
        kl.append((s, float((w * attention_transfer(student["attentions"][s], teacher["attentions"][t], *groups)).sum())))
    return LayerSums(float(w.sum()), tuple(cosine), tuple(kl))


def layer_figures(sums: LayerSums) -> dict[str, float]:
    """Per-token figures per student block: ``eval_hidden_cosine/<block>`` and ``eval_attention_kl/<block>``."""
    if sums.tokens <= 0:
        return {}
    return {**{f"eval_hidden_cosine/{layer}": value / sums.tokens for layer, value in sums.cosine},
            **{f"eval_attention_kl/{layer}": value / sums.tokens for layer, value in sums.attention_kl}}


__all__ = ["HeldOutSums", "LayerSums", "figures", "held_out_sums", "layer_figures", "layer_sums"]
