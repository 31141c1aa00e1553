"""Generation in layers: one step -> a stream -> a full call (the control logic; backends do tensor work).

    prefill(...)       feed the prompt through the KV cache in chunks; the head runs on the last position only
    decode_steps(...)  a stream of DecodeStep: one sampled token per row per step, until every row stops
    generate_ids(...)  the full call: token ids in, GenerationResult out (new ids, timing stats)

Batched prompts of different lengths are left-padded: every row is fed in lock-step, the padding is never
attended to, and each row's positions count from its own first token, so a row's tokens are the ones it
would get alone. A row stops at its first stop id (kept in its output), at the token that completes one of
its stop strings (the text ends just before the string, which is never shown, not even in part, while
streaming), or at ``max_tokens``. A prompt must fit in the model's positions; generation that would run past
them is cut there, with a warning.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import Backend, GreedyAhead
from .checks import is_count
from .config import Gemma3Config
from .errors import InputError
from .sampling import SamplingParams, make_sampler

DEFAULT_PREFILL_CHUNK = 512


@dataclass
class GenerationStats:
    """Timings of one generation. Prefill ends when the first new token's logits are ready."""

    prompt_tokens: int = 0  # per row, padding excluded (the longest row for a batch)
    generated_tokens: int = 0  # summed over rows
    prefill_seconds: float = 0.0  # time to first token
    decode_seconds: float = 0.0
    batch: int = 1

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.batch * self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        """New tokens per second after the first (which prefill produced), over all rows."""
        steps = self.generated_tokens - self.batch
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "batch": self.batch,
            "time_to_first_token_s": self.prefill_seconds,
            "prompt_tokens_per_s": self.prompt_tokens_per_second,
            "generation_tokens_per_s": self.generation_tokens_per_second,
            "decode_seconds": self.decode_seconds,
        }


@dataclass
class DecodeStep:
    """One step of the stream: the token each row got (None for rows that had already stopped)."""

    index: int
    tokens: list[int | None]
    finished: list[bool]
    last: bool = False  # the stream ends after this step (every row stopped, or max_tokens reached)


@dataclass
class GenerationResult:
    """New token ids per row (stop id included when one ended the row), why each row ended, and timings."""

    token_rows: list[list[int]]
    finish_reasons: list[str]  # "stop" or "length"
    stats: GenerationStats
    texts: list[str] | None = None

    @property
    def tokens(self) -> list[int] | list[list[int]]:
        """The new ids: a flat list for a single prompt, one list per row for a batch."""
        return self.token_rows[0] if len(self.token_rows) == 1 else self.token_rows

    @property
    def text(self) -> str | list[str] | None:
        if self.texts is None:
            return None
        return self.texts[0] if len(self.texts) == 1 else self.texts


@dataclass
class Generator:
    """The state of one generation: backend, native model, cache, sampler, per-row histories."""

    backend: Backend
    model: Any
    config: Gemma3Config
    prompts: list[list[int]]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    pad_id: int = 0
    stop_strings: tuple[str, ...] = ()
    tokenizer: Any = None  # needed for stop strings and for text (track_text)
    track_text: bool = False  # keep each row's decoded text as it grows (streaming), even with no stop string
    # Greedy decoding one step ahead on the device, where the backend offers it (backend.GreedyAhead); the
    # same tokens as the host-side argmax. False keeps every step's logits coming to the host.
    device_greedy: bool = True

    def __post_init__(self) -> None:
        if not self.prompts or any(len(p) == 0 for p in self.prompts):
            raise InputError("every prompt needs at least one token (an empty prompt has nothing to continue)")
        vocab = self.config.vocab_size
        for row in self.prompts:
            bad = [t for t in row if not 0 <= int(t) < vocab]
            if bad:
                raise InputError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if self.prefill_chunk < 1:
            raise InputError(f"prefill chunk size {self.prefill_chunk} must be >= 1")
        longest = max(len(p) for p in self.prompts)
        limit = self.config.max_position_embeddings
        if longest >= limit:
            raise InputError(
                f"the prompt has {longest} tokens but this model takes at most {limit} positions "
                f"(max_position_embeddings), leaving none to generate: shorten the prompt"
            )
        if self.stop_strings and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer, and this model has none: give stop token ids instead")
        self.row_texts = (
            [RowText(self.tokenizer, self.stop_strings) for _ in self.prompts]
            if self.stop_strings or (self.track_text and self.tokenizer is not None) else None
        )
        self.pad_lengths = [longest - len(p) for p in self.prompts]
        self.cache = self.backend.new_cache(self.model, batch=len(self.prompts), pad_lengths=self.pad_lengths)
        self.histories = [list(p) for p in self.prompts]
        self.sampler = make_sampler(self.params)
        greedy = self.params.temperature == 0 and self.params.repetition_penalty == 1.0  # argmax of raw logits
        self.greedy_ahead = self.device_greedy and greedy and isinstance(self.backend, GreedyAhead)

    def prefill(self) -> np.ndarray:
        """Feed the (left-padded) prompts in chunks; logits [batch, vocab] of each row's last token."""
        longest = max(len(p) for p in self.prompts)
        ids = np.full((len(self.prompts), longest), self.pad_id, dtype=np.int64)
        for row, (prompt, pad) in enumerate(zip(self.prompts, self.pad_lengths, strict=True)):
            ids[row, pad:] = prompt
        logits = None
        for start in range(0, longest, self.prefill_chunk):
            last = start + self.prefill_chunk >= longest
            chunk = ids[:, start : start + self.prefill_chunk]
            logits = self.backend.extend(self.model, self.cache, chunk, logits="last" if last else "none")
        return logits

    def sample(self, logits: np.ndarray) -> np.ndarray:
        return np.asarray(self.sampler(logits, self.histories), dtype=np.int64)

    def feed(self, tokens: np.ndarray) -> np.ndarray:
        """One decoding step: append one token per row, return the logits that follow it."""
        return self.backend.extend(self.model, self.cache, tokens[:, None], logits="last")


def decode_steps(gen: Generator, max_tokens: int, stats: GenerationStats | None = None) -> Iterator[DecodeStep]:
    """The stream: prefill, then one DecodeStep per new token until every row stopped or hit max_tokens."""
    max_tokens = _fit_positions(gen, max_tokens)
    stats = stats if stats is not None else GenerationStats()
    batch = len(gen.prompts)
    stats.batch, stats.prompt_tokens = batch, max(len(p) for p in gen.prompts)
    finished = [False] * batch

    start = time.perf_counter()
    logits = gen.prefill()
    stats.prefill_seconds = time.perf_counter() - start
    decode_start = time.perf_counter()
    ahead: Iterator[np.ndarray] | None = None  # the backend's greedy tokens, once it decodes ahead
    try:
        for index in range(max_tokens):
            tokens = gen.sample(logits) if ahead is None else next(ahead)
            out: list[int | None] = []
            for row in range(batch):
                if finished[row]:
                    out.append(None)
                    continue
                token = int(tokens[row])
                gen.histories[row].append(token)
                out.append(token)
                stats.generated_tokens += 1
                finished[row] = token in gen.stop_ids
                if gen.row_texts is not None and not finished[row]:  # a stop id adds no text
                    finished[row] = gen.row_texts[row].add(token)
            done = all(finished) or index == max_tokens - 1
            if not done:
                # Rows that stopped keep being fed so the batch stays in lock-step (their tokens are dropped).
                if gen.greedy_ahead:
                    if ahead is None:
                        ahead = gen.backend.greedy_tokens(gen.model, gen.cache, tokens)
                else:
                    logits = gen.feed(tokens)
            stats.decode_seconds = time.perf_counter() - decode_start
            yield DecodeStep(index, out, list(finished), last=done)
            if done:
                return
    finally:
        if ahead is not None:
            ahead.close()


def _fit_positions(gen: Generator, max_tokens: int) -> int:
    """``max_tokens``, cut (with a warning) so no row runs past the model's last position."""
    if not is_count(max_tokens) or max_tokens < 1:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    room = gen.config.max_position_embeddings - max(len(p) for p in gen.prompts)
    if max_tokens > room:
        warnings.warn(
            f"max_tokens {max_tokens} would run past the model's {gen.config.max_position_embeddings} positions: "
            f"generating at most {room}",
            stacklevel=3,
        )
        return room
    return int(max_tokens)


def generate_ids(gen: Generator, max_tokens: int) -> GenerationResult:
    """Run the stream to the end and collect each row's new tokens."""
    stats = GenerationStats()
    rows: list[list[int]] = [[] for _ in gen.prompts]
    finished = [False] * len(gen.prompts)
    for step in decode_steps(gen, max_tokens, stats):
        for row, token in enumerate(step.tokens):
            if token is not None:
                rows[row].append(token)
        finished = step.finished
    reasons = ["stop" if f else "length" for f in finished]
    texts = [t.text for t in gen.row_texts] if gen.row_texts is not None else None
    return GenerationResult(rows, reasons, stats, texts)


def normalize_prompts(prompt: Any, tokenizer: Any | None) -> tuple[list[list[int]], bool]:
    """(rows of token ids, whether the input was a batch) from a string, ids, or a list of either."""

    def one(p: Any) -> list[int]:
        if isinstance(p, str):
            if tokenizer is None:
                raise InputError("this model has no tokenizer: pass the prompt as a list of token ids")
            return tokenizer.encode(p)
        ids = np.asarray(p)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise InputError("a prompt is a string or a flat list of integer token ids")
        return [int(t) for t in ids]

    if isinstance(prompt, str):
        return [one(prompt)], False
    if isinstance(prompt, Sequence) or isinstance(prompt, np.ndarray):
        items = list(prompt)
        if items and (isinstance(items[0], str) or isinstance(items[0], (list, tuple, np.ndarray))):
            return [one(p) for p in items], True
        return [one(items)], False
    raise InputError(f"prompt must be a string or token ids, got {type(prompt).__name__}")


class IncrementalDetokenizer:
    """Text deltas from a growing list of token ids, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        delta, self.emitted = text[self.emitted :], len(text)
        return delta


class RowText:
    """One row's decoded text as tokens arrive, watching for stop strings.

    ``add`` feeds a token and says whether a stop string is now complete; ``take`` returns the text that is
    safe to show since the last call: never a stop string, nor the start of one that the next tokens might
    complete (that tail is held back until it is decided), nor half a UTF-8 character. ``flush`` returns the
    held-back tail once the row has ended for another reason. ``text`` is the whole text, cut before the
    stop string that ended the row.
    """

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str] = ()):
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = tuple(stop_strings)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._decoded = ""
        self._shown = 0
        self._cut: int | None = None  # where the stop string that ended the row begins

    def add(self, token: int) -> bool:
        if self._cut is not None:
            return True
        before = len(self._decoded)
        self._decoded += self._detok.add(token)
        search_from = max(0, before - self._longest + 1)  # a new match must end in the new text
        hits = [i for i in (self._decoded.find(s, search_from) for s in self._stops) if i >= 0]
        if hits:
            self._cut = min(hits)
        return self._cut is not None

    def _safe_end(self) -> int:
        if self._cut is not None:
            return self._cut
        text = self._decoded
        for keep in range(min(self._longest - 1, len(text)), 0, -1):  # the longest tail a stop string starts with
            if any(s.startswith(text[-keep:]) for s in self._stops):
                return len(text) - keep
        return len(text)

    def take(self) -> str:
        end = max(self._safe_end(), self._shown)
        piece, self._shown = self._decoded[self._shown : end], end
        return piece

    def flush(self) -> str:
        end = self._cut if self._cut is not None else len(self._decoded)
        piece, self._shown = self._decoded[self._shown : end], max(end, self._shown)
        return piece

    @property
    def text(self) -> str:
        return self._decoded if self._cut is None else self._decoded[: self._cut]


def split_stops(stop: Sequence[int | str] | int | str | None) -> tuple[list[int], tuple[str, ...]]:
    """(stop ids, stop strings) of a ``stop=`` argument: integers are token ids, strings are text."""
    if stop is None:
        return [], ()
    items = [stop] if isinstance(stop, int | str | np.integer) else list(stop)
    ids, strings = [], []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise InputError("an empty stop string would stop at once: drop it")
            strings.append(item)
        elif is_count(item):
            ids.append(int(item))
        else:
            raise InputError(f"stop entries are token ids (int) or stop strings (str), got {item!r}")
    return ids, tuple(strings)


def stop_ids_for(config: Gemma3Config, generation_eos: Sequence[int] | None, extra: Sequence[int] | None) -> frozenset[int]:
    """The ids that end a row: generation_config.json's eos ids (1 and 106 for instruction-tuned Gemma),
    else the config's, plus any given (each checked against the vocabulary)."""
    base = list(generation_eos) if generation_eos else list(config.eos_token_ids)
    bad = [t for t in extra or [] if not 0 <= int(t) < config.vocab_size]
    if bad:
        raise InputError(f"stop id {bad[0]} is outside the vocabulary [0, {config.vocab_size}): check the id")
    return frozenset(int(t) for t in [*base, *(extra or [])])
