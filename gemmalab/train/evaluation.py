"""Perplexity of a model on a data source: ``gemmalab eval``.

Which windows are scored is a decision made here, once. A checkpoint written by ``gemmalab train`` knows its
run's data, sequence length, seed and held-out fraction (its ``trainer_state.json``), so by default it is
scored on the very held-out windows the run reported, never on the 98% it trained on. Any other checkpoint,
or other data, is scored on all of it. ``split`` overrides either way.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backend import get_backend
from ..checks import is_count
from ..errors import InputError
from ..streaming import LayerStream
from ..tokenizer import Tokenizer
from . import checkpoints
from .data import Batch, DataStream, load_documents, make_batch, pack
from .losses import cross_entropy, perplexity_from_loss
from .spec import LOSS_CHUNK_TOKENS

SPLITS = ("auto", "held-out", "all")
DEFAULT_SEQ_LEN = 256


@dataclass(frozen=True)
class EvalPlan:
    """What ``perplexity`` scores: the data, its windows, and which of them."""

    data: str | None  # None = the embedded corpus
    seq_len: int
    split: str  # "held-out" or "all"
    seed: int = 0  # of the held-out split (the training run's)
    eval_fraction: float = 0.02

    def describe(self) -> str:
        where = self.data or "the embedded corpus"
        if self.split == "all":
            return f"all of {where}"
        return f"the held-out {self.eval_fraction:.0%} of {where} (seed {self.seed}, as `gemmalab train` splits it)"


def _same_path(a: str | None, b: str | None) -> bool:
    """Whether two data sources are the same (None = the embedded corpus; paths compared resolved)."""
    if a is None or b is None:
        return a is None and b is None
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def plan_eval(folder: Path | None, data: str | None = None, seq_len: int | None = None, split: str = "auto",
              max_positions: int | None = None) -> EvalPlan:
    """The windows to score for the checkpoint in ``folder`` (None for a preset), given what the user asked
    (``max_positions``: the model's, to refuse windows past them before anything is read)."""
    if split not in SPLITS:
        raise InputError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    _check_count("sequence length", seq_len, "--seq-len 256", allow_none=True)
    _check_positions(seq_len, max_positions)
    state = folder / checkpoints.STATE_FILE if folder is not None else None
    run = checkpoints.read_state(folder)["config"] if state is not None and state.is_file() else None
    if run is None:
        chosen = "all" if split == "auto" else split
        return EvalPlan(data, DEFAULT_SEQ_LEN if seq_len is None else seq_len, chosen)
    same_data = data is None or _same_path(data, run.get("data"))
    data = run.get("data") if data is None else data
    chosen = ("held-out" if same_data else "all") if split == "auto" else split
    run_seq_len = int(run.get("seq_len", DEFAULT_SEQ_LEN))
    if seq_len is None:
        seq_len = run_seq_len if same_data else DEFAULT_SEQ_LEN
    if chosen == "held-out" and same_data and seq_len != run_seq_len:
        warnings.warn(
            f"windows of {seq_len} tokens are not the run's {run_seq_len}: its held-out split then overlaps the "
            f"text it trained on; leave --seq-len out to score the run's own held-out windows",
            stacklevel=2,
        )
    return EvalPlan(data, seq_len, chosen, int(run.get("seed", 0)), float(run.get("eval_fraction", 0.02)))


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per predicted token, nats
    perplexity: float
    tokens: int
    seconds: float
    windows: int = 0
    scored: str = ""  # what was scored, in words (EvalPlan.describe)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens, "windows": self.windows,
                "seconds": self.seconds, "tokens_per_s": self.tokens_per_s, "scored": self.scored}


def _check_count(name: str, value: object, flag: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not is_count(value) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}: pass e.g. {flag}")


def _check_positions(seq_len: int | None, limit: int | None) -> None:
    if limit is not None and isinstance(seq_len, int) and seq_len > limit:
        raise InputError(f"--seq-len {seq_len} is past this model's {limit} positions: pass at most {limit}")


def perplexity(model, data: str | None = None, *, seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = 8,
               max_batches: int | None = None, split: str = "all", seed: int = 0, eval_fraction: float = 0.02,
               chunk_tokens: int = LOSS_CHUNK_TOKENS, progress: bool = False, plan: EvalPlan | None = None) -> EvalResult:
    """Mean loss and perplexity of ``model`` (a gemmalab.Model) over the packed windows of ``data``: all of
    them (``split="all"``), or the held-out ones ``gemmalab train`` sets aside with ``seed`` and
    ``eval_fraction`` (``split="held-out"``). ``plan`` (from plan_eval) replaces data, seq_len, split, seed
    and eval_fraction."""
    plan = plan or EvalPlan(data, seq_len, split, seed, eval_fraction)
    batches = _batches(plan, model.tokenizer, model.config.max_position_embeddings, batch_size, max_batches)
    backend = get_backend(model.backend)
    started = time.perf_counter()
    shown = batches
    if progress:
        from rich.progress import track

        shown = track(batches, description="eval", transient=True)
    total = sum(backend.loss_sum(model.native, batch.inputs, batch.targets, batch.weights, chunk_tokens=chunk_tokens)
                for batch in shown)
    return _result(total, batches, time.perf_counter() - started, plan, batch_size)


def streamed_perplexity(stream: LayerStream, tokenizer: Tokenizer | None, *, plan: EvalPlan, batch_size: int = 8,
                        max_batches: int | None = None, chunk_tokens: int = LOSS_CHUNK_TOKENS,
                        phase: Callable[[str], None] | None = None) -> EvalResult:
    """``perplexity`` of a model never whole in memory (gemmalab.streaming.LayerStream): every batch goes
    through each group of blocks before the next group is read, then the cross-entropy is taken from the
    float32 logits chunk by chunk, in float64 (``phase`` hears which stage runs)."""
    batches = _batches(plan, tokenizer, stream.config.max_position_embeddings, batch_size, max_batches)
    started = time.perf_counter()
    rows = max(batch.inputs.shape[0] for batch in batches)
    total = 0.0
    for index, start, logits in stream.logit_chunks([batch.inputs for batch in batches], phase=phase,
                                                    chunk_tokens=max(1, chunk_tokens // rows)):
        batch, span = batches[index], slice(start, start + logits.shape[1])
        total += _weighted_cross_entropy(logits, batch.targets[:, span], batch.weights[:, span])
    return _result(total, batches, time.perf_counter() - started, plan, batch_size)


def _weighted_cross_entropy(logits: np.ndarray, targets: np.ndarray, weights: np.ndarray, block: int = 16) -> float:
    """sum(weights * cross-entropy) of float32 logits [rows, n, vocab], ``block`` positions at a time: the
    float64 working copies then stay at block x vocab (a few MB at 262k ids), whatever the chunk."""
    vocab = logits.shape[-1]
    flat_logits, flat_targets, flat_weights = logits.reshape(-1, vocab), targets.reshape(-1), weights.reshape(-1)
    return sum(float((flat_weights[i : i + block] * cross_entropy(flat_logits[i : i + block], flat_targets[i : i + block])).sum())
               for i in range(0, len(flat_targets), block))


def _batches(plan: EvalPlan, tokenizer: Tokenizer | None, max_positions: int | None, batch_size: int,
             max_batches: int | None) -> list[Batch]:
    """The batches ``plan`` scores, checked: the windows of its split, ``batch_size`` to a batch."""
    _check_count("batch size", batch_size, "--batch-size 8")
    _check_count("max batches", max_batches, "--max-batches 10, or leave it out for every batch", allow_none=True)
    if plan.split not in ("held-out", "all"):
        raise InputError(f"split {plan.split!r} is not one of held-out, all")
    _check_positions(plan.seq_len, max_positions)
    if tokenizer is None:
        raise InputError("this model has no tokenizer, so text cannot be scored: use a checkpoint that ships one")
    windows, trained = pack(load_documents(plan.data), tokenizer, plan.seq_len)
    if plan.split == "held-out":
        stream = DataStream(windows, trained, seed=plan.seed, eval_fraction=plan.eval_fraction)
        windows, trained = stream.eval_windows, stream.eval_trained
        if len(windows) == 0:
            raise InputError("the held-out split is empty (eval_fraction 0, or a single window): pass --split all")
    starts = list(range(0, len(windows), batch_size))[:max_batches]
    return [make_batch(windows[start : start + batch_size], trained[start : start + batch_size]) for start in starts]


def _result(total: float, batches: list[Batch], seconds: float, plan: EvalPlan, batch_size: int) -> EvalResult:
    tokens = sum(batch.tokens for batch in batches)
    if tokens == 0:
        raise InputError(f"nothing to score in {plan.describe()}: the windows hold no trained tokens")
    loss = total / tokens
    return EvalResult(loss, perplexity_from_loss(loss), tokens, seconds, sum(b.inputs.shape[0] for b in batches),
                      plan.describe())


__all__ = ["EvalPlan", "EvalResult", "SPLITS", "perplexity", "plan_eval", "streamed_perplexity"]
