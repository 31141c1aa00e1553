"""Held-out figures of a distillation run, in numpy from the two models' logits: the teacher's perplexity, the
student's top-1 agreement with the teacher and KL(teacher || student) at temperature 1.

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


__all__ = ["HeldOutSums", "figures", "held_out_sums"]
