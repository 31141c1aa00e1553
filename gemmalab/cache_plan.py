"""The KV-cache plan, decided once here in numpy: for every extend of a cache, per layer type, which positions
the new tokens have, which cached slots they read, which keys each new query may see, and which slots the
new keys and values are written to. A backend only gathers, attends and scatters as the plan says (or
computes the same rule on its device, tested equal to this one).

The cache serves ``batch`` rows fed in lock-step. Every token written gets an *index* 0, 1, 2, ... (the same
for every row); row r's first ``pad[r]`` indices are left padding. Buffers per layer type:

* global layers: slot = index, so the buffer holds every token written;
* local layers: a ring of exactly ``sliding_window`` slots, slot = index % window.

One extend feeds ``n`` new tokens and attends over ``[the cached slots it reads, then the n new tokens]``
(the uniform layout; a backend may store and read differently when that is equivalent). The rules:

* positions: the new tokens' positions are given (Set Block Decoding repeats them) or default to
  ``index - pad`` (0 for padding), so a left-padded row computes what it would alone;
* a real query attends to a real cached key when the key's position is not after its own (causal) and, on
  local layers, is above ``position - window``; to a new key, by the explicit ``mask`` over the new tokens
  when given, else by the same causal rule; on local layers the window applies on top of either;
* padding is never attended to by a real query, and a padding query attends to itself only (so its unused
  output stays finite): one rule for every backend;
* only the first ``write`` new tokens (default all) are stored, at indices ``length ..``; on a ring, only
  the last ``window`` of those (earlier ones would be overwritten by the same write). A block that is only
  looked at (``write=0``) leaves the cache as it was.

The key axis of a cached step's attention probabilities (``Backend.extend_forward``) is this uniform layout,
the same on every backend: column c < cached is buffer slot ``read_slots[c]`` as it was *before* the step's
writes (slot order: on a ring that has wrapped, not position order), then column cached + t is new token t.
``LayerPlan.key_positions`` [batch, cached + n] names the position each column holds (``NO_POSITION`` for
padding), so a caller maps the columns onto positions without knowing the ring.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .checks import is_count
from .config import SLIDING, Gemma3Config
from .errors import InputError
from .masks import as_mask, as_positions, check_every_query_sees_a_key

NO_POSITION = -1  # a slot nothing real was written to (padding or not yet filled)


@dataclass(frozen=True)
class LayerPlan:
    """One layer type's part of an extend."""

    read_slots: np.ndarray  # [cached] int: buffer slots to gather, in the order of the mask's first keys
    mask: np.ndarray  # [batch, n, cached + n] bool: True where new query t may attend to the key
    write_slots: np.ndarray  # [w] int: buffer slots the written tokens go to
    write_tokens: np.ndarray  # [w] int: which of the n new tokens goes to each written slot
    key_positions: np.ndarray  # [batch, cached + n] int64: the position each key of the mask holds
    # (NO_POSITION: padding), the read slots' as they were before this extend, then the new tokens'


@dataclass(frozen=True)
class ExtendPlan:
    positions: np.ndarray  # [batch, n] int64: RoPE positions of the new tokens
    written: int  # how many of the new tokens are stored (indices length .. length + written - 1)
    layers: dict[str, LayerPlan]  # by layer type

    def key_positions(self, layer_types: Sequence[str], layers: Iterable[int]) -> dict[int, np.ndarray]:
        """The positions [batch, cached + n] of the key axis of each of ``layers`` (indices into
        ``layer_types``, the config's): what a captured step's attention columns hold (module docstring)."""
        return {i: self.layers[layer_types[i]].key_positions for i in layers}


@dataclass
class CachePlanner:
    """The host-side state of one KV cache: how many tokens it holds, its padding, and the position each
    slot holds per row. ``plan`` decides an extend; ``commit`` records it once the backend has done it.

    A backend hands an extend's explicit arguments over with ``request`` and reads them back as a plan with
    ``take_plan`` (None when nothing was asked: the backend may then take its own equivalent fast path and
    ``commit_default``), or plans the extend itself with ``request_plan`` (a captured step, whose keys must
    come in the plan's layout even when nothing explicit was asked)."""

    config: Gemma3Config
    batch: int
    pad_lengths: list[int] | None = None
    length: int = 0
    slot_positions: dict[str, np.ndarray] = field(default_factory=dict)  # [batch, slots]: NO_POSITION = empty
    _request: dict | ExtendPlan | None = None  # the next extend's arguments, or its plan (take_plan)

    def __post_init__(self) -> None:
        pads = [0] * self.batch if self.pad_lengths is None else list(self.pad_lengths)
        if len(pads) != self.batch or any(p < 0 for p in pads):
            raise InputError(f"pad_lengths must be {self.batch} non-negative counts, got {pads}")
        self.pad = np.asarray(pads, dtype=np.int64)
        for kind in set(self.config.layer_types):
            self.slot_positions.setdefault(kind, np.full((self.batch, 0), NO_POSITION, dtype=np.int64))

    def window(self, kind: str) -> int | None:
        return self.config.sliding_window if kind == SLIDING else None

    def request(self, *, positions: object = None, mask: object = None, write: int | None = None) -> None:
        """Keep the next extend's explicit arguments (any may be None) until ``take_plan``."""
        given = {"positions": positions, "mask": mask, "write": write}
        self._request = {k: v for k, v in given.items() if v is not None} or None

    def request_plan(self, n: int, *, positions: object = None, mask: object = None,
                     write: int | None = None) -> ExtendPlan:
        """Plan the next extend of ``n`` tokens now, with or without explicit arguments, and keep the plan
        for ``take_plan``: the extend then follows it (and its key layout) whatever was asked. Raises
        InputError, before anything changes, on bad arguments."""
        self._request = None
        plan = self.plan(n, positions=positions, mask=mask, write=write)
        self._request = plan
        return plan

    def take_plan(self, n: int) -> ExtendPlan | None:
        """The plan for the requested arguments and ``n`` new tokens, once; None when none were requested."""
        request, self._request = self._request, None
        if isinstance(request, ExtendPlan):
            if request.positions.shape[1] != n:
                planned = request.positions.shape[1]
                raise InputError(f"the extend was planned for {planned} tokens but got {n}")
            return request
        return None if request is None else self.plan(n, **request)

    def _default_positions(self, index: np.ndarray) -> np.ndarray:
        """[batch, len(index)]: index - pad, and 0 for padding."""
        return np.maximum(index[None, :] - self.pad[:, None], 0)

    def _written(self, kind: str, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(which of the written tokens are stored, their slots) for tokens written at ``index``: every one
        on a global layer; on a ring only the last ``window`` (earlier ones would be overwritten at once)."""
        window, written = self.window(kind), len(index)
        if window is None:
            return np.arange(written), index
        kept = np.arange(max(0, written - window), written)
        return kept, index[kept] % window

    def plan(self, n: int, *, positions: object = None, mask: object = None, write: int | None = None) -> ExtendPlan:
        """The plan for ``n`` new tokens after the ``length`` cached ones (see the module docstring)."""
        if not is_count(n) or n < 1:
            raise InputError(f"an extend feeds at least one token, got {n!r}")
        written = n if write is None else write
        if not is_count(written) or not 0 <= written <= n:
            raise InputError(f"write must be between 0 and the {n} new tokens, got {write!r}")
        index = self.length + np.arange(n)  # [n]
        real_q = index[None, :] >= self.pad[:, None]  # [batch, n]
        if positions is None:
            at = self._default_positions(index)  # [batch, n]
        else:
            at = as_positions(positions, self.batch, n).copy()
        explicit = None if mask is None else as_mask(mask, self.batch, n, n)
        layers = {}
        for kind, slots in self.slot_positions.items():
            layers[kind] = self._layer_plan(kind, slots, at, real_q, explicit, index, int(written))
        if explicit is not None:  # the default rule lets every query see itself
            check_every_query_sees_a_key({kind: layer.mask for kind, layer in layers.items()})
        return ExtendPlan(at, int(written), layers)

    def _layer_plan(self, kind: str, slots: np.ndarray, at: np.ndarray, real_q: np.ndarray,
                    explicit: np.ndarray | None, index: np.ndarray, written: int) -> LayerPlan:
        window, n = self.window(kind), len(index)
        read = np.arange(slots.shape[1])  # every filled slot; the mask decides what each query sees
        key_pos = slots[:, read]  # [batch, cached]
        cached = (key_pos[:, None, :] != NO_POSITION) & (key_pos[:, None, :] <= at[:, :, None])  # [batch, n, cached]
        new = explicit if explicit is not None else at[:, None, :] <= at[:, :, None]  # [batch, n, n]
        new = new & (index[None, None, :] >= self.pad[:, None, None])  # real queries see no new padding
        if window is not None:
            cached = cached & (key_pos[:, None, :] > at[:, :, None] - window)
            new = new & (at[:, None, :] > at[:, :, None] - window)
        allowed = np.concatenate([cached, new], axis=-1) & real_q[:, :, None]
        # a padding query attends to itself only
        own = np.zeros((n, len(read) + n), dtype=bool)
        own[np.arange(n), len(read) + np.arange(n)] = True
        allowed = allowed | (own[None] & ~real_q[:, :, None])
        kept, write_slots = self._written(kind, index[:written])
        new_pos = np.where(index[None, :] >= self.pad[:, None], at, NO_POSITION)  # [batch, n]
        key_positions = np.concatenate([key_pos, new_pos], axis=1)  # [batch, cached + n]
        return LayerPlan(read, allowed, write_slots.astype(np.int64), kept.astype(np.int64), key_positions)

    def commit(self, plan: ExtendPlan) -> None:
        """Record that the backend stored the plan's written tokens."""
        self._record(plan.positions[:, : plan.written])

    def commit_default(self, n: int) -> None:
        """Record ``n`` tokens written at their default positions, for a backend that took its own
        equivalent fast path (no explicit positions, mask or write) and needed no plan."""
        self._record(self._default_positions(self.length + np.arange(n)))

    def _record(self, positions: np.ndarray) -> None:
        """Store the positions [batch, written] of the tokens written at indices length .. (padding: none)."""
        written = positions.shape[1]
        index = self.length + np.arange(written)
        stored = np.where(index[None, :] >= self.pad[:, None], positions, NO_POSITION)
        for kind, slots in self.slot_positions.items():
            window = self.window(kind)
            new_length = self.length + written
            size = new_length if window is None else min(new_length, window)
            if slots.shape[1] < size:
                grown = np.full((self.batch, size), NO_POSITION, dtype=np.int64)
                grown[:, : slots.shape[1]] = slots
                slots = grown
            kept, target = self._written(kind, index)
            slots[:, target] = stored[:, kept]
            self.slot_positions[kind] = slots
        self.length += written


__all__ = ["NO_POSITION", "CachePlanner", "ExtendPlan", "LayerPlan"]
