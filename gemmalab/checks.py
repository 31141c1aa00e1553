"""Checks of what callers hand to a backend, done once here rather than in every backend.

Each raises InputError with one line naming the problem and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InputError

LOGITS_MODES = ("last", "all", "none")


def is_count(value: object) -> bool:
    """An integer (Python or numpy) and not a bool: what a count, an index or a size must be."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_token_ids(ids: object, vocab_size: int) -> np.ndarray:
    """``ids`` as an int64 array [batch, n >= 1] with every id in [0, vocab_size)."""
    array = np.asarray(ids)
    if array.ndim != 2 or array.shape[1] < 1 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"token ids must be an integer array [batch, n >= 1], got {array.dtype} {array.shape}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= vocab_size:
        raise InputError(f"token ids must lie in [0, {vocab_size}), got ids from {low} to {high}: check the tokenizer")
    return array.astype(np.int64, copy=False)


def check_logits_mode(mode: str) -> str:
    if mode not in LOGITS_MODES:
        raise InputError(f"logits must be 'last', 'all' or 'none', got {mode!r}")
    return mode


def check_chunk_tokens(chunk_tokens: object) -> int:
    """Positions per chunk of a chunked output head: a positive integer (a chunk bounds the logits held)."""
    if not is_count(chunk_tokens) or chunk_tokens < 1:
        raise InputError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}: pass e.g. 512")
    return int(chunk_tokens)


def check_cache_request(batch: object, pad_lengths: Sequence[int] | None) -> tuple[int, list[int] | None]:
    """(batch, pad lengths) for a new KV cache: a positive batch and one non-negative pad count per row."""
    if not is_count(batch) or batch < 1:
        raise InputError(f"batch must be a positive integer, got {batch!r}")
    if pad_lengths is None:
        return int(batch), None
    pads = list(pad_lengths)
    if len(pads) != batch:
        raise InputError(f"pad_lengths has {len(pads)} entries but batch is {batch}: give one per row")
    if any(not is_count(p) or p < 0 for p in pads):
        raise InputError(f"pad_lengths must be non-negative integers, got {pads}")
    return int(batch), [int(p) for p in pads]


def check_selection(value: object, count: int, name: str) -> tuple[int, ...]:
    """Which of ``count`` indexed things a capture asks for: True = all, False/None = none, or a collection
    of indices (negative ones count from the end), as a sorted tuple without repeats."""
    if value is None or value is False:
        return ()
    if value is True:
        return tuple(range(count))
    try:
        items = list(value)  # type: ignore[call-overload]
    except TypeError:
        raise InputError(f"{name} must be True, False or a list of indices, got {value!r}") from None
    picked = set()
    for item in items:
        if not is_count(item) or not -count <= item < count:
            raise InputError(f"{name} index {item!r} is not an integer in [0, {count}): there are {count}")
        picked.add(int(item) % count)
    return tuple(sorted(picked))

