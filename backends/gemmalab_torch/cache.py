"""KV caches for incremental decoding: a growing buffer per global layer, a ring buffer per local layer.

A ``KVCache`` serves ``batch`` sequences fed in lock-step. Every token fed gets an *index* (0, 1, 2, ...,
the same for every row); row r's first ``pad[r]`` indices are left padding, and its RoPE position is
``index - pad[r]``, so a left-padded row computes what the same row alone would. Masks compare indices:
the per-row offset cancels in ``k <= q`` and ``k > q - window``, and padding is masked separately.

Buffers are [batch, kv_heads, slots, head_dim] in the model's matmul dtype, allocated on first use:

* global layers (``window=None``): slot = index. When full, the buffer grows by an eighth of its size (at
  least to what is needed, rounded up to ``GRAIN`` slots) and is copied over: the size follows the
  sequence with at most ~1/8 slack, and the copies cost O(1) amortised per token.
* local layers (``window=W``): slot = index % W. The buffer grows like a global one until it holds W
  slots and never beyond, so its memory stays flat however long the sequence grows.

Each ``extend`` of n tokens after ``start`` cached ones stores keys one of three ways (``layout``), chosen
the same way for every layer of a type so that one mask per layer type serves all of them:

* ``APPEND``: no slot is reused (every global layer; a local layer before it wraps). New keys go to
  slots start .. start+n-1 and attention reads slots 0 .. start+n-1.
* ``OVERWRITE``: one new token on a full ring. It replaces index start - W, which lies outside the new
  query's window (keys start-W+1 .. start), so it is written first and the whole ring is read.
* ``CONCAT``: several new tokens that wrap the ring. The chunk's early queries still need keys its late
  tokens would overwrite, so attention reads [filled ring slots, then the chunk] (a temporary copy), and
  only then are the chunk's last min(n, W) keys written into the ring.

Attention never reads a slot that was not written: slices stop at the filled part. A forward pass that
fails half-way leaves some layers updated and others not; the cache then refuses further use.

An extend with explicit positions, a mask over the new tokens, or a limit on how many of them are written
(``planner.request``: Set Block Decoding's block steps) follows the core's plan instead (gemmalab.cache_plan): keys
are [the plan's cached slots, then the new tokens], the mask is the plan's, and only the plan's slots are
written. The slots are the same as above (slot = index, or index % window), and the core's planner records
every extend either way, so the two paths mix freely.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gemmalab.cache_plan import CachePlanner, ExtendPlan
from gemmalab.config import SLIDING, Gemma3Config, RopeSpec
from gemmalab.errors import BackendError

from .model import _at_least_fp32, causal_mask, fold_mask, rope_tables

GRAIN = 16  # buffer sizes are multiples of this many positions (or the window)
APPEND, OVERWRITE, CONCAT = "append", "overwrite", "concat"


def layout(start: int, n: int, window: int | None) -> str:
    """How n new keys after ``start`` cached ones are stored (see the module docstring)."""
    if window is None or start + n <= window:
        return APPEND
    return OVERWRITE if n == 1 else CONCAT


def slot_indices(end: int, window: int, device: torch.device) -> Tensor:
    """Which token index each ring slot holds after indices 0 .. end-1 were written: slot s holds the latest
    index i < end with i % window == s. [window] int64; when end < window, slots >= end hold nothing yet."""
    slots = torch.arange(window, device=device)
    return (end - 1) - (end - 1 - slots) % window


class LayerCache:
    """One layer's keys and values. ``Attention`` calls ``update`` with the new keys and values and attends
    over what it returns; the shared state (how many tokens came before) lives in the owning KVCache."""

    def __init__(self, owner: KVCache, window: int | None, layer_type: str) -> None:
        self.owner = owner
        self.window = window  # None on global layers
        self.layer_type = layer_type
        self.keys: Tensor | None = None  # [batch, kv_heads, capacity, head_dim]
        self.values: Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new k, v [batch, kv_heads, n, head_dim]; return the keys and values to attend over,
        [batch, kv_heads, keys, head_dim], in the order the owner's mask for this layer type expects."""
        plan = self.owner.plan
        if plan is not None:
            return self._update_by_plan(plan.layers[self.layer_type], k, v)
        start, n, window = self.owner.length, k.shape[2], self.window
        mode = layout(start, n, window)
        if mode == APPEND:
            end = start + n
            self._reserve(end, k)
            self.keys[:, :, start:end] = k
            self.values[:, :, start:end] = v
            return self.keys[:, :, :end], self.values[:, :, :end]
        if mode == OVERWRITE:
            slot = start % window
            self.keys[:, :, slot : slot + 1] = k
            self.values[:, :, slot : slot + 1] = v
            return self.keys, self.values
        # CONCAT: attend over the filled ring and the whole chunk, then keep the chunk's last `window` keys.
        filled = min(start, window)
        self._reserve(window, k)
        keys = torch.cat([self.keys[:, :, :filled], k], dim=2)  # [batch, kv_heads, filled + n, head_dim]
        values = torch.cat([self.values[:, :, :filled], v], dim=2)
        kept = min(n, window)
        slots = self.owner.ring_write_slots[window]  # [kept] slots of indices start+n-kept .. start+n-1
        self.keys.index_copy_(2, slots, k[:, :, n - kept :])
        self.values.index_copy_(2, slots, v[:, :, n - kept :])
        return keys, values

    def _update_by_plan(self, plan, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The plan's layout (gemmalab.cache_plan): attend over [its cached slots, the new tokens], then
        write the new tokens it names into its slots (reads come first: a ring may reuse a read slot)."""
        read = torch.as_tensor(plan.read_slots, device=k.device)
        if self.keys is None or len(read) == 0:
            keys, values = k, v
        else:
            keys = torch.cat([self.keys.index_select(2, read), k], dim=2)  # [batch, kv_heads, cached + n, d]
            values = torch.cat([self.values.index_select(2, read), v], dim=2)
        if len(plan.write_slots):
            self._reserve(int(plan.write_slots.max()) + 1, k)
            slots = torch.as_tensor(plan.write_slots, device=k.device)
            tokens = torch.as_tensor(plan.write_tokens, device=k.device)
            self.keys.index_copy_(2, slots, k.index_select(2, tokens))
            self.values.index_copy_(2, slots, v.index_select(2, tokens))
        return keys, values

    def _reserve(self, needed: int, like: Tensor) -> None:
        """Make room for ``needed`` slots: grow by >= 1/8 (see the module docstring), a ring never beyond
        its window."""
        if needed <= self.capacity:
            return
        size = max(needed, self.capacity + self.capacity // 8)
        size = -(-size // GRAIN) * GRAIN
        if self.window is not None:
            size = min(size, self.window)
        batch, kv_heads, _, head_dim = like.shape
        keys = like.new_zeros(batch, kv_heads, size, head_dim)
        values = like.new_zeros(batch, kv_heads, size, head_dim)
        if self.keys is not None:
            keys[:, :, : self.capacity] = self.keys
            values[:, :, : self.capacity] = self.values
        self.keys, self.values = keys, values


class KVCache:
    """KV caches of every layer of one model for ``batch`` rows, plus what all layers of a type share:
    the token count, the left padding, and each extend's RoPE tables and masks (see the module docstring)."""

    def __init__(
        self,
        config: Gemma3Config,
        *,
        batch: int,
        pad_lengths: list[int] | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.config = config
        self.batch = batch
        self.dtype = dtype  # the model's matmul dtype: keys and values are stored in it
        self.device = device
        self.length = 0  # tokens fed so far, per row (padding included)
        pads = [0] * batch if pad_lengths is None else [int(p) for p in pad_lengths]
        self.padded = any(pads)
        self.pad = torch.tensor(pads, dtype=torch.long, device=device)  # [batch]
        self.windows = {t: (config.sliding_window if t == SLIDING else None) for t in set(config.layer_types)}
        self.layers = [LayerCache(self, self.windows[t], t) for t in config.layer_types]
        self.planner = CachePlanner(config, batch, pads)  # the core's record of what every slot holds
        self.plan: ExtendPlan | None = None  # the plan of the extend under way, when it needs one
        self.ring_write_slots: dict[int, Tensor] = {}  # window -> slots a CONCAT update writes
        self.rope_specs = {config.rope(i) for i in range(config.num_hidden_layers)}
        self._in_update = False

    def nbytes(self) -> dict[str, int]:
        out = dict.fromkeys(self.windows, 0)
        for layer_type, layer in zip(self.config.layer_types, self.layers, strict=True):
            out[layer_type] += layer.nbytes()
        return out

    # -- one extend: planner.request (optional), prepare (before the layers run), advance (after) --------
    def prepare(self, n: int) -> tuple[dict[RopeSpec, tuple[Tensor, Tensor]], dict[str, Tensor | None]]:
        """RoPE tables per spec (cos, sin [batch or 1, n, 1, head_dim]) and folded masks per layer type
        ([batch or 1, 1, n * groups, keys], or None when every key returned by ``update`` is allowed) for
        n new tokens."""
        if self._in_update:
            raise BackendError("this KV cache was left mid-update by a failed call: start a new cache")
        self.plan = self.planner.take_plan(n)  # raises InputError before anything changes
        self._in_update = True
        if self.plan is not None:
            return self._prepare_by_plan(self.plan)
        start, device = self.length, self.device
        q_index = torch.arange(start, start + n, device=device)  # [n]

        # RoPE for the new positions only (tens of microseconds), by the full forward pass's own function.
        if self.padded:
            positions = (q_index[None, :] - self.pad[:, None]).clamp(min=0)  # [batch, n]; padding at 0
        else:
            positions = q_index[None, :]  # [1, n]
        table_dtype = _at_least_fp32(self.dtype)
        ropes = {
            spec: rope_tables(positions, spec, self.config.head_dim, table_dtype) for spec in self.rope_specs
        }

        masks = {}
        for layer_type, window in self.windows.items():
            mode = layout(start, n, window)
            if mode == CONCAT:
                kept = min(n, window)
                written = torch.arange(start + n - kept, start + n, device=device)
                self.ring_write_slots[window] = written % window
            if n == 1 and not self.padded:
                masks[layer_type] = None  # one query, keys all earlier and (local) inside the window
                continue
            if mode == APPEND:
                k_index = torch.arange(start + n, device=device)
            elif mode == OVERWRITE:
                k_index = slot_indices(start + 1, window, device)
            else:
                filled = slot_indices(start, window, device)[: min(start, window)]
                k_index = torch.cat([filled, q_index])
            masks[layer_type] = self._mask(q_index, k_index, window)
        return ropes, masks

    def _prepare_by_plan(self, plan: ExtendPlan) -> tuple[dict[RopeSpec, tuple[Tensor, Tensor]], dict[str, Tensor]]:
        positions = torch.as_tensor(plan.positions, device=self.device)  # [batch, n]
        table_dtype = _at_least_fp32(self.dtype)
        ropes = {spec: rope_tables(positions, spec, self.config.head_dim, table_dtype) for spec in self.rope_specs}
        masks = {
            kind: fold_mask(torch.as_tensor(layer.mask[:, None], device=self.device), self.config.num_kv_groups)
            for kind, layer in plan.layers.items()
        }  # [batch, 1, n * groups, cached + n]
        return ropes, masks

    def advance(self, n: int) -> None:
        """Every layer has stored its new keys and values (all n, or what the plan wrote)."""
        if self.plan is not None:
            self.planner.commit(self.plan)
            self.length += self.plan.written
            self.plan = None
        else:
            self.planner.commit_default(n)
            self.length += n
        self._in_update = False

    def _mask(self, q_index: Tensor, k_index: Tensor, window: int | None) -> Tensor:
        """Folded boolean mask [batch or 1, 1, n * groups, keys]: causal and windowed by index, padding never
        attended to by a real token, and a padding token attending to itself only (so its own, unused,
        output stays finite): the core's padding rule (gemmalab.cache_plan)."""
        allowed = causal_mask(q_index[None], k_index[None], window)  # [1, 1, n, keys]
        if self.padded:
            real_k = (k_index[None, :] >= self.pad[:, None])[:, None, None, :]  # [batch, 1, 1, keys]
            real_q = (q_index[None, :] >= self.pad[:, None])[:, None, :, None]  # [batch, 1, n, 1]
            itself = (k_index[None, :] == q_index[:, None])[None, None]  # [1, 1, n, keys]
            allowed = (allowed & real_k & real_q) | (itself & ~real_q)  # [batch, 1, n, keys]
        return fold_mask(allowed, self.config.num_kv_groups)
