"""Distillation from an offline teacher cache (gemmalab.distill.cache): no teacher in memory. Each batch
carries the cache's sparse targets of its windows (``Batch.windows``) as the extra inputs of the loss's
CachedDistillation term (gemmalab.train.losses).

The cache must be this run's: made with the student's tokenizer, for the student's vocabulary, over exactly
the windows this run packs (the data fingerprint covers the data, the tokenizer and seq_len), at the run's
distillation temperature. Anything else is refused in one line before a step is taken.

Evaluation without the teacher: top-1 agreement is exact for a top-k cache (its first id is the teacher's
argmax) and KL(teacher || student) is the k + 1 bucket KL of gemmalab.distill.sparse (a lower bound of the full
KL, equal to it at k = vocabulary); a sampled cache gives neither. The teacher's perplexity needs the
teacher: ``gemmalab eval TEACHER`` on the same held-out windows gives it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ..config import Gemma3Config, resolve_config
from ..errors import ConfigError
from ..tokenizer import Tokenizer
from ..train.objective import ModelSource, Objective, checkpoint_source
from .cache_format import TeacherCache, data_fingerprint
from .config import DistillConfig
from .sparse import SparseTargets, sparse_kl

# The extra inputs of the CachedDistillation term (gemmalab.train.losses.cached_distillation_loss's names).
IDS, LOGPROBS, TAIL = "teacher_ids", "teacher_logprobs", "teacher_tail"


def as_extras(targets: SparseTargets) -> dict[str, np.ndarray]:
    """A batch's sparse targets as the loss term's extra inputs (a sampled cache has no tail)."""
    extras = {IDS: targets.ids, LOGPROBS: targets.logprobs}
    if not targets.sampled:
        extras[TAIL] = targets.tail
    return extras


class CachedTeacherObjective(Objective):
    """Distillation from a teacher cache (see the module docstring)."""

    command = "gemmalab distill"

    def __init__(self, config: DistillConfig):
        self.config = config
        self.cache = TeacherCache.open(config.cache)
        if not math.isclose(config.temperature, self.cache.temperature, rel_tol=1e-9):
            raise ConfigError(f"the teacher cache {self.cache.path} holds the teacher's distribution at temperature "
                              f"{self.cache.temperature}, this run distils at {config.temperature}: pass --temperature "
                              f"{self.cache.temperature}, or build a cache at {config.temperature}")
        if config.seq_len != self.cache.seq_len:
            raise ConfigError(f"the teacher cache {self.cache.path} holds windows of {self.cache.seq_len} positions, this "
                              f"run packs {config.seq_len}: pass --seq-len {self.cache.seq_len}")

    @property
    def estimator(self) -> str:
        return "sampled" if self.cache.sampled else "top-k"

    def model_source(self, config: DistillConfig) -> ModelSource:
        if config.model is not None:
            source = checkpoint_source(config.model, "distillation")
            self.cache.check(tokenizer_fingerprint=source.tokenizer.fingerprint)
            return source
        tokenizer = self.cache.tokenizer()
        if tokenizer is None:
            raise ConfigError(f"the teacher cache {self.cache.path} has no tokenizer.json, which a preset student would "
                              "take: rebuild it with gemmalab distill cache, or give the student as a checkpoint")
        self.cache.check(tokenizer_fingerprint=tokenizer.fingerprint)
        shape = dataclasses.replace(resolve_config(config.preset), vocab_size=self.cache.vocab_size)
        return ModelSource(shape, None, tokenizer)

    def start(self, backend: Any, config: DistillConfig, model_config: Gemma3Config, tokenizer: Tokenizer,
              windows: Any, trained: Any, echo=print) -> None:
        # The cache's ids are the teacher's, which the student must be able to score: same vocabulary.
        self.cache.check(vocab_size=model_config.vocab_size,
                         data_fingerprint=data_fingerprint(windows, trained, config.seq_len))
        echo(f"teacher cache {self.cache.path}: {self.cache.windows} windows, {self.estimator} "
             f"k={self.cache.top_k} at temperature {self.cache.temperature} (no teacher in memory)")

    def train_spec(self, config: DistillConfig) -> Any:
        return config.train_spec(cached=self.estimator)

    def batch_extras(self, batch: Any) -> dict[str, np.ndarray]:
        return as_extras(self.cache.targets(batch.windows))

    def evaluate(self, backend: Any, native: Any, stream: Any, config: DistillConfig) -> dict[str, float]:
        """Per held-out token: top-1 agreement with the cache's first id, and the bucket KL at the cache's
        temperature (the only one it holds; the online teacher's figure is at 1, so build the cache at 1 to
        compare them); nothing from a sampled cache."""
        if self.cache.sampled:
            return {}
        tokens = agreements = kl = 0.0
        for batch in stream.eval_batches(config.batch_size, config.eval_batches):
            targets = self.cache.targets(batch.windows)
            for row in range(batch.inputs.shape[0]):
                logits = backend.logits(native, batch.inputs[row : row + 1])[0]  # float32 [seq, vocab]
                w = batch.weights[row].astype(np.float64)
                row_targets = SparseTargets(targets.ids[row], targets.logprobs[row], targets.tail[row])
                agreements += float((w * (logits.argmax(-1) == row_targets.ids[:, 0])).sum())
                kl += float((w * sparse_kl(logits, row_targets, self.cache.temperature)).sum())
                tokens += float(w.sum())
        if tokens <= 0:
            return {}
        return {"eval_top1_agreement": agreements / tokens, "eval_kl": kl / tokens}


__all__ = ["IDS", "LOGPROBS", "TAIL", "CachedTeacherObjective", "as_extras"]
