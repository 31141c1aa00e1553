"""Perplexity of a model on a data source: ``gemmalab eval``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ..backend import get_backend
from ..errors import InputError
from ..tokenizer import Tokenizer
from .data import load_documents, make_batch, pack
from .spec import LOSS_CHUNK_TOKENS


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per predicted token, nats
    perplexity: float
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens,
                "seconds": self.seconds, "tokens_per_s": self.tokens_per_s}


def perplexity(model, data: str | None, *, seq_len: int = 256, batch_size: int = 8, max_batches: int | None = None,
               chunk_tokens: int = LOSS_CHUNK_TOKENS, progress: bool = False) -> EvalResult:
    """Mean loss and perplexity of ``model`` (a gemmalab.Model) over every packed window of ``data``."""
    tokenizer: Tokenizer | None = model.tokenizer
    if tokenizer is None:
        raise InputError("this model has no tokenizer, so text cannot be scored: use a checkpoint that ships one")
    windows, trained = pack(load_documents(data), tokenizer, seq_len)
    starts = list(range(0, len(windows), batch_size))[:max_batches]
    backend = get_backend(model.backend)
    total, tokens = 0.0, 0
    started = time.perf_counter()
    iterator = starts
    if progress:
        from rich.progress import track

        iterator = track(starts, description="eval", transient=True)
    for start in iterator:
        batch = make_batch(windows[start : start + batch_size], trained[start : start + batch_size])
        total += backend.loss_sum(model.native, batch.inputs, batch.targets, batch.weights, chunk_tokens=chunk_tokens)
        tokens += batch.tokens
    seconds = time.perf_counter() - started
    loss = total / max(tokens, 1)
    return EvalResult(loss, math.exp(min(loss, 700.0)), tokens, seconds)


__all__ = ["EvalResult", "perplexity"]
