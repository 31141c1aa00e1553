"""KV caches for incremental decoding: a growing buffer per global layer, a ring buffer per local layer.

A ``KVCache`` serves ``batch`` sequences fed in lock-step. Every token fed gets an *index* (0, 1, 2, ...,
the same for every row); row r's first ``pad[r]`` indices are left padding, and its RoPE position is
``index - pad[r]``, so a left-padded row computes what the same row alone would. Masks compare indices:
the per-row offset cancels in ``k <= q`` and ``k > q - window``, and padding is masked separately (a real
token never attends to padding; a padding token attends to itself only, so its unused output stays finite:
the core's rule, gemmalab.cache_plan).

Buffers are [batch, slots, kv_heads, head_dim] in the model's matmul dtype, placed by the sharding plan
(batch over "data", kv heads over "model"), and donated to the jitted step, which returns them updated:

* global layers: slot = index. The host grows the buffer before a step that would overflow it, to the
  next power of two (at least ``MIN_CAPACITY``, at most max_position_embeddings unless more is needed):
  every capacity is one compiled shape of the step, so a context of L tokens compiles the decode step
  about log2(L / 16) times, and the buffer holds at most twice what is used. Inside the step the new
  keys are written at slots start .. start+n-1 and attention reads the whole buffer; slots not yet
  written hold indices beyond every query, so the causal mask hides them.
* local layers: a ring of exactly ``sliding_window`` slots, allocated with the cache; slot = index % W, so
  its memory stays flat however long the context grows. Attention reads [the ring as it was, then the new
  chunk] (W + n keys), each ring slot's index computed from ``start`` (slots never written get a negative
  index and are masked); then the chunk's last min(n, W) keys are written into the ring. This one rule
  covers a ring still filling, a full ring, and chunks longer than the window: the chunk's early queries
  still see the keys its late tokens overwrite. A single token (decoding) takes a shortcut without the
  copy: it is written first and attention reads the ring alone, because the key it overwrites (index
  start - W) is already outside its window.

``start`` (tokens already cached) is a traced scalar, so one compiled step serves every decoding step of
a given batch, chunk length and global capacity.

Inside a step the model sees a ``StepCache`` (the host-side ``KVCache`` cannot enter the jit): the step's
RoPE tables and masks, and one ``LayerCache`` per layer, whose ``update(k, v)`` each attention layer calls,
as on the other backends.

A step with explicit positions, a mask over its new tokens, or a limit on how many of them are written
(Set Block Decoding's block steps) follows the core's plan instead (gemmalab.cache_plan, ``planned_step``,
whose layers are ``PlannedLayerCache``): attention reads [every buffer slot, then the new tokens] under the
plan's mask, laid onto the whole buffer (slots the plan does not read are masked, so shapes stay static),
and only the plan's tokens are written, into the same slots as above. The core's planner records every
step either way. With static capture arguments the planned step also returns hidden states and attention
probabilities, as the uncached captured forward computes them (nothing changes when none are asked).

Outside a jit, ``model.text_model`` (and ``forward``) also take the host ``KVCache`` itself, as the PyTorch
and MLX models take theirs: the step then runs by the plan (``KVCache.run_step``, jitted as ``host_step``),
and its attention probabilities come back over the plan's layout [its read slots, then the new tokens].
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemmalab.cache_plan import CachePlanner, ExtendPlan, LayerPlan
from gemmalab.config import SLIDING, Gemma3Config
from gemmalab.errors import InputError

from .model import (
    DTYPES,
    Gemma3Output,
    Params,
    Rope,
    causal_mask,
    layer_rope_tables,
    logits_from_hidden,
    text_model,
)
from .sharding import Plan
from .training import hidden_state  # the captured forward's rule (transformers' convention)

MIN_CAPACITY = 16
Buffers = list[tuple[jax.Array, jax.Array]]  # per layer: (keys, values) [batch, slots, kv_heads, head_dim]


def global_capacity(needed: int, limit: int) -> int:
    """Slots of a global buffer that must hold ``needed`` indices (see the module docstring)."""
    size = max(MIN_CAPACITY, 1 << (needed - 1).bit_length())
    return max(needed, min(size, limit))


def _key_index(window: int | None, slots: int, q_index: jax.Array, start: jax.Array, n: int) -> jax.Array:
    """The token index of every key attention reads for a layer type in a step of n tokens after
    ``start``, [keys]."""
    if window is None:
        return jnp.arange(slots, dtype=q_index.dtype)  # slot = index
    slot = jnp.arange(window, dtype=q_index.dtype)
    # Slot s holds the latest index <= last that is s mod W: last - ((last - s) mod W), negative when
    # never written; last = start - 1 before this step's writes, or start once one token was written.
    last = start if n == 1 else start - 1
    ring = last - jnp.remainder(last - slot, window)
    return ring if n == 1 else jnp.concatenate([ring, q_index])  # [W] or [W + n]


def _step_mask(q_index: jax.Array, k_index: jax.Array, window: int | None, pad: jax.Array) -> jax.Array:
    """Boolean [batch, 1, n, keys]: causal and windowed by index, written slots only, no padding read by
    a real token, and a padding token attending to itself only: the core's padding rule
    (gemmalab.cache_plan)."""
    allowed = causal_mask(q_index[None], k_index[None], window) & (k_index >= 0)  # [1, 1, n, keys]
    real_k = (k_index[None, :] >= pad[:, None])[:, None, None, :]  # [batch, 1, 1, keys]
    real_q = (q_index[None, :] >= pad[:, None])[:, None, :, None]  # [batch, 1, n, 1]
    itself = (k_index[None, :] == q_index[:, None])[None, None]  # [1, 1, n, keys]
    return (allowed & real_k & real_q) | (itself & ~real_q)  # [batch, 1, n, keys]


class LayerCache:
    """One layer's keys and values inside one jitted step of n new tokens after ``start`` cached ones
    (model.attention calls ``update``). ``keys``, ``values`` [batch, slots, kv_heads, head_dim] are the
    step's input buffers, then the updated ones."""

    def __init__(
        self, keys: jax.Array, values: jax.Array, window: int | None, start: jax.Array, n: int, plan: Plan
    ):
        self.keys, self.values = keys, values
        self.window, self.start, self.n, self.plan = window, start, n, plan

    def update(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Store new k, v [batch, n, kv_heads, head_dim]; return the keys and values to attend over
        [batch, keys, kv_heads, head_dim], in the order of the step's mask for this layer's type."""
        keys, values = self.keys, self.values
        window, n = self.window, self.n
        if window is None:
            at = (0, self.start, 0, 0)
            keys = jax.lax.dynamic_update_slice(keys, k, at)  # slots start .. start+n-1
            values = jax.lax.dynamic_update_slice(values, v, at)
            self.keys, self.values = pin_buffer(self.plan, keys), pin_buffer(self.plan, values)
            return keys, values
        read = jnp.concatenate([keys, k], axis=1), jnp.concatenate([values, v], axis=1)  # [b, W + n, kv, d]
        kept = min(n, window)
        slots = jnp.remainder(self.start + n - kept + jnp.arange(kept, dtype=self.start.dtype), window)
        keys = keys.at[:, slots].set(k[:, n - kept :])
        values = values.at[:, slots].set(v[:, n - kept :])
        self.keys, self.values = pin_buffer(self.plan, keys), pin_buffer(self.plan, values)
        return (keys, values) if n == 1 else read  # one token: attend over the ring it was written to


class PlannedLayerCache:
    """One layer's keys and values inside one jitted planned step: attention reads [the whole buffer, the
    new tokens] under the host's masks; the new keys and values the plan names (``tokens``) are scattered
    into their ``slots``."""

    def __init__(self, keys: jax.Array, values: jax.Array, slots: jax.Array, tokens: jax.Array, plan: Plan):
        self.keys, self.values, self.slots, self.tokens, self.plan = keys, values, slots, tokens, plan

    def update(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """As LayerCache.update, in the plan's layout."""
        keys, values = self.keys, self.values
        read = jnp.concatenate([keys, k], axis=1), jnp.concatenate([values, v], axis=1)  # [b, slots + n, kv, d]
        keys = keys.at[:, self.slots].set(k[:, self.tokens])
        values = values.at[:, self.slots].set(v[:, self.tokens])
        self.keys, self.values = pin_buffer(self.plan, keys), pin_buffer(self.plan, values)
        return read


class StepCache:
    """The KV cache inside one jitted step, as model.text_model reads it (PyTorch's and MLX's models read
    their KVCache itself; here the host handle cannot enter the jit): the step's RoPE tables and masks per
    layer type and one layer cache per layer. After the step, ``buffers()`` are the updated buffers."""

    def __init__(self, rope: Rope, masks: dict[str, jax.Array], layers: list[LayerCache | PlannedLayerCache]):
        self.rope, self.masks, self.layers = rope, masks, layers

    @classmethod
    def for_step(
        cls,
        config: Gemma3Config,
        buffers: Buffers,
        rope: Rope,
        start: jax.Array,
        pad: jax.Array,
        n: int,
        plan: Plan,
    ) -> StepCache:
        """n new tokens after ``start`` cached ones: builds the masks of each layer type once."""
        windows = [config.sliding_window if t == SLIDING else None for t in config.layer_types]
        q_index = start + jnp.arange(n, dtype=start.dtype)  # [n]
        masks = {}
        for layer, layer_type in enumerate(config.layer_types):
            if layer_type not in masks:
                keys = _key_index(windows[layer], buffers[layer][0].shape[1], q_index, start, n)
                masks[layer_type] = _step_mask(q_index, keys, windows[layer], pad)
        layers = [LayerCache(k, v, windows[i], start, n, plan) for i, (k, v) in enumerate(buffers)]
        return cls(rope, masks, layers)

    @classmethod
    def for_plan(
        cls, config: Gemma3Config, buffers: Buffers, rope: Rope, masks: dict[str, jax.Array],
        writes: dict[str, tuple[jax.Array, jax.Array]], plan: Plan,
    ) -> StepCache:
        """A planned step: the host's masks per layer type, and the (slots, tokens) each layer type writes."""
        layers = [
            PlannedLayerCache(k, v, *writes[config.layer_types[i]], plan) for i, (k, v) in enumerate(buffers)
        ]
        return cls(rope, masks, layers)

    def buffers(self) -> Buffers:
        return [(layer.keys, layer.values) for layer in self.layers]


def pin_buffer(plan: Plan, buffer: jax.Array) -> jax.Array:
    """Keep an updated buffer where the input one was (so donation reuses it and the next step hits the
    same compiled function)."""
    if plan.size == 1:
        return buffer
    return jax.lax.with_sharding_constraint(buffer, plan.cache_sharding(buffer.shape))


def extend_step(
    params: Params,
    buffers: Buffers,
    ids: jax.Array,
    rope: Rope,
    start: jax.Array,
    pad: jax.Array,
    *,
    config: Gemma3Config,
    plan: Plan,
    mode: str,
) -> tuple[jax.Array | None, Buffers]:
    """One incremental forward pass (jitted by the backend, ``buffers`` donated): ids [batch, n] after
    ``start`` cached tokens. Returns float32 logits (mode "last": [batch, vocab], the head on the last
    position only; "all": [batch, n, vocab]; "none": None, and XLA drops the last layer's unused MLP) and
    the updated buffers."""
    cache = StepCache.for_step(config, buffers, rope, start, pad, ids.shape[1], plan)
    hidden = text_model(params, config, ids, cache=cache, hint=plan.hint).last_hidden_state
    return _step_logits(params, config, plan, hidden, mode), cache.buffers()


def _step_logits(params: Params, config: Gemma3Config, plan: Plan, hidden: jax.Array, mode: str) -> jax.Array | None:
    """A step's float32 logits for ``mode`` (see extend_step): the head runs only on what is read."""
    if mode == "none":
        return None
    if mode == "last":
        hidden = hidden[:, -1]  # [batch, hidden]
    return logits_from_hidden(params, config, hidden, plan.hint).astype(jnp.float32)


def planned_step(
    params: Params,
    buffers: Buffers,
    ids: jax.Array,
    rope: Rope,
    masks: dict[str, jax.Array],
    writes: dict[str, tuple[jax.Array, jax.Array]],
    *,
    config: Gemma3Config,
    plan: Plan,
    mode: str,
    hidden_states: tuple[int, ...] = (),
    attentions: tuple[int, ...] = (),
) -> tuple[jax.Array | None, Buffers, dict[int, jax.Array], dict[int, jax.Array]]:
    """One incremental pass that follows a host plan (gemmalab.cache_plan), jitted by the backend with
    ``buffers`` donated: masks [batch, 1, n, slots + n] per layer type, writes (slots, tokens) per layer type.
    Returns what ``extend_step`` returns, then the captures (static: which hidden-state indices, which
    layers' probabilities), as the uncached captured forward makes them: float32 hidden states [batch, n,
    hidden] by index and probabilities [batch, heads, n, slots + n] by layer (the keys of ``masks``). With
    nothing to capture both are empty and the step computes what it always did."""
    cache = StepCache.for_plan(config, buffers, rope, masks, writes, plan)
    out = text_model(
        params, config, ids, cache=cache, hint=plan.hint, output_hidden_states=bool(hidden_states),
        output_attentions=frozenset(attentions),
    )
    picked = {i: hidden_state(out, i).astype(jnp.float32) for i in hidden_states}
    probs = {i: out.attentions[i] for i in attentions}
    return _step_logits(params, config, plan, out.last_hidden_state, mode), cache.buffers(), picked, probs


def host_step(
    params: Params,
    buffers: Buffers,
    ids: jax.Array,
    rope: Rope,
    masks: dict[str, jax.Array],
    writes: dict[str, tuple[jax.Array, jax.Array]],
    *,
    config: Gemma3Config,
    plan: Plan,
    output_hidden_states: bool,
    output_attentions: bool | frozenset[int],
    hint: Any,
) -> tuple[Gemma3Output, Buffers]:
    """The text model through a planned StepCache (``planned_step``'s layout), returning its Gemma3Output
    and the updated buffers: what ``KVCache.run_step`` jits (buffers not donated: a failed call leaves the
    cache as it was)."""
    cache = StepCache.for_plan(config, buffers, rope, masks, writes, plan)
    out = text_model(params, config, ids, cache=cache, hint=hint, output_hidden_states=output_hidden_states,
                     output_attentions=output_attentions)
    return out, cache.buffers()


_jit_host_step = jax.jit(
    host_step, static_argnames=("config", "plan", "output_hidden_states", "output_attentions", "hint")
)


def plan_columns(layer: LayerPlan, keys: int) -> np.ndarray:
    """Which columns of a planned step's key axis (``keys`` = the whole buffer's slots, then the n new
    tokens) make the plan's own layout, [its read slots, then the new tokens]: the columns dropped are the
    slots the plan does not read, masked in the step (probability 0)."""
    n = layer.mask.shape[1]
    return np.concatenate([layer.read_slots, keys - n + np.arange(n)])


class KVCache:
    """The host-side cache handle: the buffers, how many tokens they hold, each row's left padding."""

    def __init__(
        self, config: Gemma3Config, *, batch: int, pad_lengths: list[int] | None, dtype: str, plan: Plan
    ):
        self.config, self.batch, self.dtype, self.plan = config, batch, dtype, plan
        self.length = 0  # tokens fed so far, per row (padding included)
        self.pad_lengths = (
            np.zeros(batch, np.int32) if pad_lengths is None else np.asarray(pad_lengths, np.int32)
        )
        self.pad = jax.device_put(self.pad_lengths, plan.batch_sharding((batch,)))
        self.capacity = 0  # slots of each global buffer
        self.planner = CachePlanner(config, batch, [int(p) for p in self.pad_lengths])  # the core's record
        self._buffers: Buffers | None = [
            self._zeros(config.sliding_window if t == SLIDING else 0) for t in config.layer_types
        ]

    def _shape(self, slots: int) -> tuple[int, ...]:
        return (self.batch, slots, self.config.num_key_value_heads, self.config.head_dim)

    def _zeros(self, slots: int) -> tuple[jax.Array, jax.Array]:
        shape = self._shape(slots)
        sharding = self.plan.cache_sharding(shape)  # allocated on the devices directly, already sharded
        return tuple(jnp.zeros(shape, DTYPES[self.dtype], device=sharding) for _ in range(2))

    @property
    def buffers(self) -> Buffers:
        if self._buffers is None:
            raise InputError("this KV cache was left mid-update by a failed call: start a new cache")
        return self._buffers

    def take(self) -> Buffers:
        """Hand the buffers to a step that donates them; the cache is unusable until ``put``."""
        buffers, self._buffers = self.buffers, None
        return buffers

    def put(self, buffers: Buffers, n: int, extend_plan: ExtendPlan | None = None) -> None:
        """The buffers back from a step that stored ``n`` tokens (by ``extend_plan`` when it had one)."""
        self._buffers = buffers
        if extend_plan is not None:
            self.planner.commit(extend_plan)
        else:
            self.planner.commit_default(n)
        self.length += n

    def run_step(self, params: Params, ids: jax.Array, *, output_hidden_states: bool = False,
                 output_attentions: bool | Collection[int] = False, hint: Any = None) -> Gemma3Output:
        """One step outside any jit, as PyTorch's and MLX's models take their caches (``model.text_model``
        called with this host cache comes here): the text model over ``ids`` [batch, n] by the core's plan
        (the requested one, else the default), through ``host_step`` (jitted, per shape and capture as the
        backend's planned step). The attention probabilities come back over the plan's own key layout,
        [its read slots, then the new tokens] (gemmalab.cache_plan), as PyTorch's and MLX's planned steps
        read them. The buffers and the planner change only once the step is done."""
        batch, n = ids.shape
        if batch != self.batch:
            raise InputError(f"this cache holds {self.batch} rows but ids have {batch}: make a cache for them")
        extend_plan = self.planner.take_plan(n) or self.planner.plan(n)
        self.reserve(self.length + max(extend_plan.written, 1))

        def place(array: np.ndarray) -> jax.Array:
            return jax.device_put(array, self.plan.batch_sharding(array.shape))

        rope = {kind: (place(cos), place(sin))
                for kind, (cos, sin) in layer_rope_tables(self.config, extend_plan.positions).items()}
        masks, writes = self.planned_inputs(extend_plan)
        wanted = True if output_attentions is True else frozenset(output_attentions or ())
        precise = contextlib.nullcontext()
        if self.dtype == "float32":
            precise = jax.default_matmul_precision("highest")
        with precise:  # as the backend's jitted steps trace float32 models (backend.JaxModel._precision)
            out, updated = _jit_host_step(
                params, self.buffers, ids, rope, {kind: place(m) for kind, m in masks.items()}, writes,
                config=self.config, plan=self.plan, output_hidden_states=bool(output_hidden_states),
                output_attentions=wanted, hint=hint or self.plan.hint,
            )
        self.put(updated, extend_plan.written, extend_plan)
        if out.attentions is None:
            return out
        laid = [
            None if probs is None else probs[..., plan_columns(extend_plan.layers[kind], probs.shape[-1])]
            for kind, probs in zip(self.config.layer_types, out.attentions, strict=True)
        ]
        return out._replace(attentions=laid)

    def planned_inputs(self, extend_plan: ExtendPlan) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
        """The plan laid onto whole buffers: masks [batch, 1, n, slots + n] (unread slots masked) and the
        (slots, tokens) each layer type writes."""
        masks, writes = {}, {}
        for layer_type, layer in extend_plan.layers.items():
            slots = self.config.sliding_window if layer_type == SLIDING else self.capacity
            batch, n, _ = layer.mask.shape
            cached = len(layer.read_slots)
            full = np.zeros((batch, n, slots + n), dtype=bool)
            full[:, :, layer.read_slots] = layer.mask[:, :, :cached]
            full[:, :, slots:] = layer.mask[:, :, cached:]
            masks[layer_type] = full[:, None]
            writes[layer_type] = (layer.write_slots.astype(np.int32), layer.write_tokens.astype(np.int32))
        return masks, writes

    def reserve(self, needed: int) -> None:
        """Grow the global buffers to hold ``needed`` indices (copying what they hold)."""
        if needed <= self.capacity:
            return
        size = global_capacity(needed, self.config.max_position_embeddings)
        sharding = self.plan.cache_sharding(self._shape(size))

        def grow(buffer: jax.Array) -> jax.Array:
            return jax.device_put(
                jnp.pad(buffer, ((0, 0), (0, size - buffer.shape[1]), (0, 0), (0, 0))), sharding
            )

        self._buffers = [
            (grow(k), grow(v)) if t != SLIDING else (k, v)
            for t, (k, v) in zip(self.config.layer_types, self.buffers, strict=True)
        ]
        self.capacity = size

    def positions(self, n: int) -> np.ndarray:
        """RoPE positions [batch, n] of the next n tokens (index - pad; padding at 0)."""
        index = self.length + np.arange(n)
        return np.maximum(index[None, :] - self.pad_lengths[:, None], 0)

    def nbytes(self) -> dict[str, int]:
        out = dict.fromkeys(set(self.config.layer_types), 0)
        for layer_type, (k, v) in zip(self.config.layer_types, self.buffers, strict=True):
            out[layer_type] += k.nbytes + v.nbytes
        return out

    def state(self) -> Any:
        return self._buffers
