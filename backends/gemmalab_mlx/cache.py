"""KV caches for incremental decoding: a growing buffer per global layer, a ring buffer per local layer.

``KVCache`` holds one ``LayerCache`` per decoder layer for ``batch`` sequences fed in lock-step, and the
bookkeeping they share: how many tokens were fed so far (``length``, the index of the next token) and
each row's left padding. Token ``i`` of row ``r`` sits at position ``i - pad[r]``, so a left-padded row
gets the RoPE angles and the masks of the same row fed alone.

* Global layers keep every token: slot ``i`` holds token ``i``. A full buffer grows by an eighth of its
  size (at least to what is needed, rounded up to ``GRAIN`` slots) through one concatenation, so its size
  follows the sequence with at most ~1/8 slack and the copies cost O(1) per token amortised.
* Local layers keep a ring of exactly ``sliding_window`` slots: token ``i`` lives in slot ``i % window``.
  The ring grows like a global buffer up to the window, then wraps, so its memory stays flat.

(The PyTorch backend sizes its buffers by the same rule, so both report the same ``nbytes``.)

What a layer attends to in one step (``feed(n)`` tokens):

* one token, or a chunk that does not wrap the ring: the new keys are written first, then the layer
  reads the slots in use (``keys[:, :, :used]``). For one token on a full ring that is exactly the window
  (tokens ``i - window + 1 .. i``), so decoding needs no mask unless left padding is still in the window.
* a chunk of several tokens that wraps the ring: writing first would overwrite keys its own first tokens
  still need, so the layer attends to ``[ring as it was, the chunk]`` (``window + n`` keys, the sliding
  window mask hides the extras) and only then writes the chunk's last ``window`` tokens into the ring.

Masks are built on the host from absolute token indices, once per step and layer type (all layers of a
type hold the same tokens), and simplified to ``None`` (nothing hidden) or ``"causal"`` (mx.fast's own
lower-right causal mask) whenever the explicit mask would say exactly that. A padding slot is never
attended to, except by itself: a padding query must see some key, or its softmax would be 0/0 = NaN, and
NaN values in a masked-out slot would still poison the ``probabilities @ values`` product (0 * NaN).

A step with explicit positions, a mask over its new tokens, or a limit on how many of them are written
(``planner.request``: Set Block Decoding's block steps) follows the core's plan instead (gemmalab.cache_plan): the
layer attends to [the plan's cached slots, then the new tokens] under the plan's mask, RoPE takes the
plan's positions, and only the plan's tokens are written, into the same slots as above. The core's planner
records every step either way, so the two paths mix freely.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from gemmalab.cache_plan import CachePlanner, ExtendPlan
from gemmalab.config import FULL, SLIDING, Gemma3Config
from gemmalab.errors import InputError

GRAIN = 16  # buffer sizes are multiples of this many slots (or the window)

# None (attend to every key), "causal" (mx.fast's lower-right causal mask) or boolean [batch|1, 1, n, keys].
Mask = mx.array | str | None


class LayerCache:
    """Keys and values of one attention layer, each [batch, kv_heads, slots, head_dim].

    ``window=None``: a global layer (slot i = token i). ``window=W``: a local layer's ring (slot i % W).
    """

    def __init__(self, owner: KVCache, window: int | None, layer_type: str):
        self.owner = owner
        self.window = window
        self.layer_type = layer_type
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def offset(self) -> int | mx.array:
        """RoPE position of the first token of this step: an int, or one per row [batch] when padded."""
        return self.owner.rope_offset

    @property
    def positions(self) -> mx.array | None:
        """Explicit RoPE positions [batch, n] of this step's tokens (a planned step), else None."""
        return self.owner.plan_positions

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store this step's keys/values [batch, kv_heads, n, head_dim]; return the keys/values to attend to,
        laid out as ``owner.key_indices`` says (the mask of this step is built from the same layout)."""
        if self.owner.plan is not None:
            return self._update_by_plan(self.owner.plan.layers[self.layer_type], k, v)
        start, n = self.owner.start, k.shape[2]
        end = start + n
        if _wraps(self.window, start, n):
            # Attend to [old ring, chunk] (the ring read before the chunk's own tokens overwrite it).
            kept = min(start, self.window)
            if kept:
                keys = mx.concatenate([self.keys[:, :, :kept], k], axis=2)  # [b, kv, kept + n, d]
                values = mx.concatenate([self.values[:, :, :kept], v], axis=2)
            else:
                keys, values = k, v
            last = min(n, self.window)
            self._write(k[:, :, n - last :], v[:, :, n - last :], end - last)
            return keys, values
        self._write(k, v, start)
        used = end if self.window is None else min(end, self.window)
        return self.keys[:, :, :used], self.values[:, :, :used]  # [b, kv, used, d]

    def _update_by_plan(self, plan, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """The plan's layout: [its cached slots, the new tokens]; then write the new tokens it names (a
        contiguous run of indices, so ``_write`` puts them in their slots). Reads come first."""
        if self.keys is None or len(plan.read_slots) == 0:
            keys, values = k, v
        else:
            read = mx.array(plan.read_slots.astype(np.int32))
            keys = mx.concatenate([mx.take(self.keys, read, axis=2), k], axis=2)  # [b, kv, cached + n, d]
            values = mx.concatenate([mx.take(self.values, read, axis=2), v], axis=2)
        if len(plan.write_tokens):
            first, last = int(plan.write_tokens[0]), int(plan.write_tokens[-1]) + 1
            self._write(k[:, :, first:last], v[:, :, first:last], self.owner.start + first)
        return keys, values

    def _write(self, k: mx.array, v: mx.array, first: int) -> None:
        """Write the keys/values of tokens first.. into their slots (at most one wrap of the ring)."""
        n = k.shape[2]
        end = first + n
        self._reserve(end if self.window is None else min(end, self.window), k, v)
        slot = first if self.window is None else first % self.window
        head = n if self.window is None else min(n, self.window - slot)  # tokens before the ring wraps
        self.keys[:, :, slot : slot + head] = k[:, :, :head]
        self.values[:, :, slot : slot + head] = v[:, :, :head]
        if head < n:  # the rest goes to the start of the ring
            self.keys[:, :, : n - head] = k[:, :, head:]
            self.values[:, :, : n - head] = v[:, :, head:]

    def _reserve(self, slots: int, k: mx.array, v: mx.array) -> None:
        """Grow the buffers by >= 1/8 (never beyond the window) so that they hold ``slots`` slots."""
        have = 0 if self.keys is None else self.keys.shape[2]
        if slots <= have:
            return
        size = max(slots, have + have // 8)
        size = -(-size // GRAIN) * GRAIN
        if self.window is not None:
            size = min(size, self.window)
        batch, kv_heads, _, d = k.shape
        new_k = mx.zeros((batch, kv_heads, size - have, d), dtype=k.dtype)
        new_v = mx.zeros((batch, kv_heads, size - have, v.shape[3]), dtype=v.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys, new_k], axis=2)
            self.values = mx.concatenate([self.values, new_v], axis=2)


class KVCache:
    """The KV caches of every layer of a model, for ``batch`` sequences fed in lock-step."""

    def __init__(self, config: Gemma3Config, batch: int, pad_lengths: list[int] | None = None):
        if batch < 1:
            raise InputError(f"a cache needs batch >= 1, got {batch}")
        pads = np.zeros(batch, dtype=np.int64) if pad_lengths is None else np.asarray(pad_lengths)
        if pads.shape != (batch,) or not np.issubdtype(pads.dtype, np.integer) or (pads < 0).any():
            raise InputError(
                f"pad_lengths must hold one integer >= 0 per row ({batch} rows), got {pads.tolist()}"
            )
        pads = pads.astype(np.int64)
        self.config = config
        self.batch = batch
        self.pad = pads
        self.length = 0  # tokens fed so far: the index of the next token
        self.start = 0  # index of the first token of the current step
        self.rope_offset: int | mx.array = 0
        self.layers = [
            LayerCache(self, config.sliding_window if layer_type == SLIDING else None, layer_type)
            for layer_type in config.layer_types
        ]
        self.planner = CachePlanner(config, batch, [int(p) for p in pads])  # the core's record of every slot
        self.plan: ExtendPlan | None = None  # the plan of the step under way, when it needs one
        self.plan_positions: mx.array | None = None

    def feed(self, n: int) -> dict[str, Mask]:
        """Start a step of ``n`` tokens: advance the length and return its mask per layer type.

        Call it once per forward pass, before the layers' ``update``.
        """
        plan = self.planner.take_plan(n)  # what the backend requested, if anything; raises before any change
        if plan is not None:
            self.planner.commit(plan)
            self.plan, self.plan_positions = plan, mx.array(plan.positions.astype(np.int32))
            self.start, self.length = self.length, self.length + plan.written
            return {kind: mx.array(layer.mask[:, None]) for kind, layer in plan.layers.items()}
        self.plan, self.plan_positions = None, None
        self.planner.commit_default(n)
        self.start, self.length = self.length, self.length + n
        padded = bool(self.pad.any())
        # Positions of the step's first token per row; the layers' RoPE counts on from there.
        self.rope_offset = mx.array(self.start - self.pad, dtype=mx.int32) if padded else self.start
        if n == 1 and not padded:
            # Decoding: a layer reads exactly the tokens one new token may see (the ring holds the window).
            return {SLIDING: None, FULL: None}
        window = self.config.sliding_window
        return {
            layer_type: self._mask(self.key_indices(w, self.start, n), self.start, n, w)
            for layer_type, w in ((SLIDING, window), (FULL, None))
        }

    def key_indices(self, window: int | None, start: int, n: int) -> np.ndarray:
        """Token index of every key a layer attends to in a step of ``n`` tokens from ``start``, in the
        order ``LayerCache.update`` returns them."""
        end = start + n
        if window is None:
            return np.arange(end)
        if _wraps(window, start, n):
            return np.concatenate([_ring_indices(window, start), np.arange(start, end)])
        return _ring_indices(window, end)

    def _mask(self, keys: np.ndarray, start: int, n: int, window: int | None) -> Mask:
        q = np.arange(start, start + n)[:, None]  # [n, 1]
        k = keys[None, :]  # [1, keys]
        allowed = k <= q  # [n, keys]
        if window is not None:
            allowed &= k > q - window
        if self.pad.any():
            real = keys[None, None, :] >= self.pad[:, None, None]  # [batch, 1, keys]
            allowed = (allowed[None] & real) | (k == q)[None]  # [batch, n, keys]
        if allowed.all():
            return None
        count = len(keys)
        causal = np.arange(count)[None, :] <= np.arange(count - n, count)[:, None]  # mx.fast's "causal"
        if np.array_equal(np.broadcast_to(causal, allowed.shape), allowed):
            return "causal"
        return mx.array(allowed.reshape(-1, 1, n, count))  # [batch or 1, 1, n, keys]

    @property
    def state(self) -> list[mx.array]:
        """Every buffer (to evaluate them)."""
        return [a for layer in self.layers for a in (layer.keys, layer.values) if a is not None]

    def nbytes(self) -> dict[str, int]:
        out = {SLIDING: 0, FULL: 0}
        for layer_type, layer in zip(self.config.layer_types, self.layers, strict=True):
            out[layer_type] += layer.nbytes
        return out


def _wraps(window: int | None, start: int, n: int) -> bool:
    """Whether a chunk of n > 1 tokens would overwrite ring slots its own first tokens still attend to."""
    return window is not None and n > 1 and start + n > window


def _ring_indices(window: int, end: int) -> np.ndarray:
    """Token index held by each used slot of a ring after tokens 0..end-1 were written."""
    if end <= window:
        return np.arange(end)
    slots = np.arange(window)
    return end - 1 - (end - 1 - slots) % window
