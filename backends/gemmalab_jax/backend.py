"""The JAX backend: gemmalab's Backend protocol (gemmalab/backend.py) over the functions of model.py.

Numpy at the boundary, jax arrays inside. ``build`` returns a ``JaxModel``: the config, the parameter tree
(canonical HF names, see model.py), the sharding plan (sharding.py) and two jitted functions:

* ``full_logits(params, ids, rope)``: every position's float32 logits (``logits``);
* ``step(params, buffers, ids, rope, start, pad, mode=...)``: one incremental pass over a KV cache
  (``extend``; cache.py), its buffers donated and returned updated, the head run only where asked.

Both are compiled per input shape: ``full_logits`` per [batch, seq]; ``step`` per batch, chunk length and
global-buffer capacity (a power of two: few recompiles while decoding), and ``start`` is traced, so
decoding runs one compiled step over and over. float32 models trace under
``jax.default_matmul_precision("highest")``: on TPU the default would round fp32 matmul inputs to bf16.

Weights arrive as canonical name -> numpy array (float32, float16 or bfloat16 via ml_dtypes) and are cast
on the host and placed (sharded) one tensor at a time, so a checkpoint never sits in memory twice. With
``weights=None`` the tree holds jax.ShapeDtypeStruct leaves (with their shardings): nothing is allocated,
any preset builds instantly, and ``jax.jit(...).lower`` can still plan a sharded computation from it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gemmalab.backend import NO_POSITIONS, ForwardOutput
from gemmalab.checkpoint import quantized_linears
from gemmalab.checks import check_cache_request, check_chunk_tokens, check_logits_mode, check_token_ids
from gemmalab.config import Gemma3Config
from gemmalab.dtypes import canonical_dtype, numpy_dtype
from gemmalab.errors import BackendError, CheckpointError, InputError
from gemmalab.linears import STACKING_KINDS, check_kind, checked_parameter_names
from gemmalab.params import parameter_shapes
from gemmalab.stages import check_head_chunks, check_partial_names, check_run_layers, partial_problem
from gemmalab.train.spec import LOSS_CHUNK_TOKENS, TrainSpec

from . import linears
from .cache import KVCache, extend_step, plan_columns, planned_step
from .model import (
    Params,
    abstract_params,
    blocks,
    embed_ids,
    flatten,
    forward,
    layer_rope_tables,
    logits_from_hidden,
    residual_dtype,
    rms_norm,
    text_model,
    unflatten,
)
from .quantized import QuantizedLinear
from .sharding import Plan, make_mesh
from .training import Trainer, hidden_state, loss_sum
from .wrappers import WRAPPERS

_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def _full_logits(params: Params, ids: jax.Array, rope: Any, *, config: Gemma3Config, plan: Plan) -> jax.Array:
    """float32 logits [batch, seq, vocab] of a plain sequence (positions 0 .. seq-1, built-in masks)."""
    return forward(params, config, ids, rope=rope, hint=plan.hint).logits.astype(jnp.float32)


def _captured_forward(params: Params, ids: jax.Array, rope: Any, masks: Any, *, config: Gemma3Config, plan: Plan,
                      hidden_states: tuple[int, ...], attentions: tuple[int, ...], logits: bool = True) -> tuple[Any, ...]:
    """float32 (logits or None, {index: hidden state}, {layer: probabilities}) of one uncached pass with
    explicit RoPE tables and masks per layer type; hidden states in transformers' convention (ForwardOutput)."""
    out = forward(params, config, ids, mask=masks, rope=rope, hint=plan.hint,
                  output_hidden_states=bool(hidden_states), output_attentions=frozenset(attentions),
                  logits_at=None if logits else NO_POSITIONS)
    logits = out.logits.astype(jnp.float32) if logits else None
    return (logits, {i: hidden_state(out, i).astype(jnp.float32) for i in hidden_states},
            {i: out.attentions[i] for i in attentions})


def _final_hidden(params: Params, ids: jax.Array, rope: Any, *, config: Gemma3Config, plan: Plan) -> jax.Array:
    """Final normed hidden states [batch, seq, hidden] of a plain sequence, in the compute dtype: the
    backbone of ``_full_logits`` without its head (logit_chunks runs the head per chunk)."""
    return text_model(params, config, ids, rope=rope, hint=plan.hint).last_hidden_state


def _head_logits(params: Params, hidden: jax.Array, *, config: Gemma3Config, plan: Plan) -> jax.Array:
    """float32 logits [batch, n, vocab] of final normed hidden states [batch, n, hidden] (the soft-capped head)."""
    return logits_from_hidden(params, config, hidden, plan.hint).astype(jnp.float32)


def _run_layers(embed: jax.Array | None, layer_params: list, inputs: jax.Array, rope: Any, masks: Any, *,
                config: Gemma3Config, plan: Plan, layers: range, dtype: str) -> jax.Array:
    """The residual stream after the blocks ``layers``: from ids through ``embed`` first when it is given,
    else from the residual stream ``inputs`` (Backend.run_layers)."""
    x = inputs if embed is None else embed_ids(embed, config, inputs, plan.hint)
    return blocks(layer_params, config, x, rope, masks, layers, dtype=jnp.dtype(numpy_dtype(dtype)), hint=plan.hint)


def _final_norm(norm: jax.Array, x: jax.Array, *, config: Gemma3Config, dtype: str) -> jax.Array:
    """The final norm of the residual stream after the last block, in the compute dtype (text_model's)."""
    return rms_norm(x, norm, config.rms_norm_eps, jnp.dtype(numpy_dtype(dtype)))


# Module-level, with the config and plan static: models of the same config on the same mesh share compiled
# functions (the cache key also holds every input's shape, dtype and sharding).
_jit_full_logits = jax.jit(_full_logits, static_argnames=("config", "plan"))
_jit_captured_forward = jax.jit(_captured_forward,
                                static_argnames=("config", "plan", "hidden_states", "attentions", "logits"))
_jit_final_hidden = jax.jit(_final_hidden, static_argnames=("config", "plan"))
_jit_head_logits = jax.jit(_head_logits, static_argnames=("config", "plan"))  # one compile per chunk length
_jit_run_layers = jax.jit(_run_layers, static_argnames=("config", "plan", "layers", "dtype"))
_jit_final_norm = jax.jit(_final_norm, static_argnames=("config", "dtype"))
_jit_step = jax.jit(extend_step, static_argnames=("config", "plan", "mode"), donate_argnums=1)
_jit_planned_step = jax.jit(
    planned_step, static_argnames=("config", "plan", "mode", "hidden_states", "attentions"), donate_argnums=1
)


@dataclass
class JaxModel:
    """The native JAX model: parameters (or their shapes), config, dtype, sharding plan, jitted functions.
    Use ``params`` with the functions of ``gemmalab_jax.model`` to build other computations on it."""

    config: Gemma3Config
    dtype: str
    params: Params  # jax.Array leaves, or jax.ShapeDtypeStruct when built shape-only
    plan: Plan
    shape_only: bool
    pending: Any = field(default=None, repr=False)  # arrays of the last dispatched step (synchronize)
    resident: frozenset[str] | None = None  # a partial model's resident names (None: all, or shape-only none)

    def full_logits(self, ids: jax.Array, rope: Any) -> jax.Array:
        """float32 logits [batch, seq, vocab] of token ids [batch, seq] at positions 0 .. seq-1."""
        with self._precision():
            return _jit_full_logits(self.params, ids, rope, config=self.config, plan=self.plan)

    def planned_step(self, buffers: Any, ids: jax.Array, rope: Any, masks: Any, writes: Any, *, mode: str,
                     hidden_states: tuple[int, ...] = (), attentions: tuple[int, ...] = ()) -> Any:
        """cache.planned_step on this model's parameters: (logits or None, updated buffers, captured hidden
        states, captured probabilities); the captures are static (one compiled step per selection)."""
        with self._precision():
            if not hidden_states and not attentions:  # the step generation compiles, as it always was
                return _jit_planned_step(
                    self.params, buffers, ids, rope, masks, writes, config=self.config, plan=self.plan,
                    mode=mode,
                )
            return _jit_planned_step(
                self.params, buffers, ids, rope, masks, writes, config=self.config, plan=self.plan, mode=mode,
                hidden_states=hidden_states, attentions=attentions,
            )

    def step(self, buffers: Any, ids: jax.Array, rope: Any, start: Any, pad: Any, *, mode: str) -> Any:
        """cache.extend_step on this model's parameters: (logits or None, updated buffers)."""
        with self._precision():
            return _jit_step(
                self.params, buffers, ids, rope, start, pad, config=self.config, plan=self.plan, mode=mode
            )

    @property
    def mesh(self) -> Mesh:
        return self.plan.mesh

    def _precision(self) -> contextlib.AbstractContextManager:
        """The matmul precision to trace under: full fp32 for float32 models (see the module docstring)."""
        if self.dtype == "float32":
            return jax.default_matmul_precision("highest")
        return contextlib.nullcontext()

    def rope(self, positions: np.ndarray) -> dict[str, tuple[jax.Array, jax.Array]]:
        """RoPE tables per layer type for integer positions [batch or 1, n] (model.layer_rope_tables), placed
        by batch row: what the model functions take as ``rope=``."""
        out = {}
        for layer_type, (cos, sin) in layer_rope_tables(self.config, positions).items():
            sharding = self.plan.batch_sharding(cos.shape)
            out[layer_type] = jax.device_put(cos, sharding), jax.device_put(sin, sharding)
        return out

    def __repr__(self) -> str:
        state = "shape-only" if self.shape_only else f"{self.dtype}"
        return f"JaxModel({self.config.name or 'gemma3'}, {state}, {self.plan.describe()})"


class JaxBackend:
    """gemmalab's JAX backend (TPU, GPU, CPU). ``build`` returns a ``JaxModel``; it takes the extra option
    ``mesh={"data": D, "model": M}`` (or a jax Mesh with those axes) to shard the model (sharding.py)."""

    name = "jax"

    def version(self) -> str:
        return jax.__version__

    def devices(self) -> list[str]:
        """The default platform's devices (e.g. tpu:0, tpu:1, ...), then cpu: best first."""
        default = jax.devices()
        if default[0].platform == "cpu":
            return ["cpu"]
        return [f"{d.platform}:{i}" for i, d in enumerate(default)] + ["cpu"]

    def platform_devices(self, device: str | None) -> list[Any]:
        """The jax devices a device name selects: "cpu", "gpu", "tpu" (all of that platform, best first),
        or one of them, "gpu:1". None = the default platform. Raises BackendError naming the fix."""
        if device is None:
            return jax.devices()
        platform, _, index = str(device).lower().partition(":")
        platform = _ALIASES.get(platform, platform)
        try:
            found = jax.devices(platform)
        except RuntimeError:
            raise BackendError(
                f"device {device!r} is not available to the jax backend here: "
                f"use one of {', '.join(self.devices())}"
            ) from None
        if not index:
            return found
        if not index.isdigit() or int(index) >= len(found):
            raise BackendError(
                f"device {device!r} does not exist: {platform} has {len(found)} device(s) here"
            )
        return [found[int(index)]] + [d for i, d in enumerate(found) if i != int(index)]

    def build(
        self,
        config: Gemma3Config,
        weights: Mapping[str, np.ndarray] | None,
        *,
        dtype: str,
        device: str | None = None,
        partial: bool = False,
        mesh: Mapping[str, int] | Mesh | None = None,
    ) -> JaxModel:
        """The model on ``device`` (a platform or one device), or sharded over ``mesh`` on that platform.
        With ``weights=None``, shape-only: no memory, instant at any size. With ``partial`` only the given
        weights are placed, the others stay jax.ShapeDtypeStruct leaves (gemmalab.stages)."""
        dtype = canonical_dtype(dtype)
        plan = Plan(make_mesh(mesh, self.platform_devices(device)), config)
        quantized = quantized_linears(weights)
        if quantized and partial:
            raise BackendError("a partial (layer-streamed) model cannot hold quantized linears: use a dense checkpoint")
        if weights is None or partial:
            params = abstract_params(config, dtype, plan.parameter_sharding)
            if weights is None:
                return JaxModel(config, dtype, params, plan, shape_only=True)
            resident = check_partial_names(config, weights)
            flat = flatten(params)
            flat.update(self._placed(config, dtype, plan, weights, resident))
            return JaxModel(config, dtype, unflatten(flat), plan, shape_only=True, resident=resident)

        # A quantized checkpoint's linears become the quantized wrapper holding the file's numbers (below);
        # until then their leaves are shapes only (jax.ShapeDtypeStruct): no dense weight is allocated.
        skipped = {name + ".weight" for name in quantized}
        expected = {name: shape for name, shape in parameter_shapes(config).items() if name not in skipped}
        missing = [name for name in expected if name not in weights]
        unexpected = [name for name in weights if name not in expected]
        if missing or unexpected:
            problems = [
                f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                for label, names in (("missing", missing), ("unexpected", unexpected))
                if names
            ]
            raise CheckpointError(
                f"weights do not match the config ({'; '.join(problems)}): use a checkpoint made for it"
            )
        flat = self._placed(config, dtype, plan, weights, expected)
        if quantized:
            shapes = flatten(abstract_params(config, dtype, plan.parameter_sharding))
            flat.update({name: shapes[name] for name in skipped})
        if plan.fallbacks and plan.size > 1:
            warnings.warn(
                f"gemmalab jax: on {plan.describe()}, some dimensions are replicated instead of split: "
                + "; ".join(plan.fallbacks),
                stacklevel=2,
            )
        model = JaxModel(config, dtype, unflatten(flat), plan, shape_only=False)
        for name, entry in quantized.items():
            linears.wrap(model, [name], lambda _, name=name, entry=entry: QuantizedLinear.from_arrays(
                *weights.quantized_arrays(name), bits=entry.bits, group_size=entry.group_size, dtype=dtype))
        return model

    @staticmethod
    def _placed(config: Gemma3Config, dtype: str, plan: Plan, weights: Mapping[str, np.ndarray],
                names: Collection[str]) -> dict[str, jax.Array]:
        """The weights ``names`` on the devices, cast to ``dtype``, one source tensor alive at a time."""
        shapes = parameter_shapes(config)
        target = numpy_dtype(dtype)
        flat = {}
        for name in (name for name in shapes if name in names):
            array = np.asarray(weights[name])  # a lazy Mapping may read it from disk only now
            if tuple(array.shape) != shapes[name]:
                raise CheckpointError(f"{name} has shape {tuple(array.shape)} but the config needs {shapes[name]}")
            if not (np.issubdtype(array.dtype, np.floating) or array.dtype == np.dtype(target)):
                raise CheckpointError(
                    f"{name} has dtype {array.dtype}, not floating point: convert it to float32"
                )
            # Cast on the host (bf16 through ml_dtypes), then send each device its shard only.
            placed = jax.device_put(array.astype(target, copy=False), plan.parameter_sharding(name))
            flat[name] = placed.block_until_ready()  # one source tensor alive at a time
            del array
        return flat

    def logits(self, model: JaxModel, ids: np.ndarray) -> np.ndarray:
        """float32 logits [batch, seq, vocab] for int token ids [batch, seq], every position."""
        ids = self._token_ids(model, ids)
        positions = np.arange(ids.shape[1])[None]  # [1, seq]
        out = model.full_logits(self._place_ids(model, ids), model.rope(positions))
        return self._checked(model, np.asarray(out))

    def forward(
        self,
        model: JaxModel,
        ids: np.ndarray,
        *,
        positions: np.ndarray,
        masks: Mapping[str, np.ndarray],
        hidden_states: tuple[int, ...] = (),
        attentions: tuple[int, ...] = (),
        logits: bool = True,
    ) -> ForwardOutput:
        ids = self._token_ids(model, ids)
        layer_masks = {kind: jax.device_put(np.ascontiguousarray(m[:, None]), model.plan.batch_sharding(m[:, None].shape))
                       for kind, m in masks.items()}  # [batch, 1, seq, seq]
        with model._precision():
            head, picked, probs = _jit_captured_forward(
                model.params, self._place_ids(model, ids), model.rope(np.asarray(positions)), layer_masks,
                config=model.config, plan=model.plan, hidden_states=tuple(hidden_states), attentions=tuple(attentions),
                logits=logits,
            )
        head = self._checked(model, np.asarray(head)) if logits else None
        return ForwardOutput(head, {i: np.asarray(a) for i, a in picked.items()},
                             {i: np.asarray(a) for i, a in probs.items()})

    def logit_chunks(self, model: JaxModel, ids: np.ndarray, *, chunk_tokens: int = 512) -> Iterator[tuple[int, np.ndarray]]:
        """(start, float32 logits [batch, n, vocab]) of every ``chunk_tokens`` positions: one jitted backbone
        pass whose final normed hidden states stay on the device(s), then the jitted head on each chunk's
        slice of them (Backend.logit_chunks)."""
        ids = self._token_ids(model, ids)
        chunk = check_chunk_tokens(chunk_tokens)
        positions = np.arange(ids.shape[1])[None]  # [1, seq]
        with model._precision():
            hidden = _jit_final_hidden(model.params, self._place_ids(model, ids), model.rope(positions),
                                       config=model.config, plan=model.plan)  # [batch, seq, hidden]
        return self._head_chunks(model, hidden, chunk)

    def run_layers(self, model: JaxModel, inputs: np.ndarray, *, layers: range, positions: np.ndarray,
                   masks: Mapping[str, np.ndarray]) -> np.ndarray:
        """The residual stream after blocks ``layers`` (Backend.run_layers): from int ids the scaled
        embedding first, else from the residual stream ``inputs``; in the residual dtype, as numpy. One
        compiled function per group shape, fed only that group's parameters."""
        layers, from_ids = check_run_layers(model.config, model.resident, inputs, layers)
        if model.resident is None:
            _require_weights(model)
        tree = model.params["model"]
        if from_ids:
            x = self._place_ids(model, check_token_ids(inputs, model.config.vocab_size).astype(np.int32))
        else:
            x = self._placed_stream(model, inputs)
        layer_masks = {kind: jax.device_put(np.ascontiguousarray(m[:, None]), model.plan.batch_sharding(m[:, None].shape))
                       for kind, m in masks.items()}  # [batch, 1, seq, seq]
        with model._precision():
            out = _jit_run_layers(tree["embed_tokens"]["weight"] if from_ids else None,
                                  [tree["layers"][i] for i in layers], x, model.rope(np.asarray(positions)),
                                  layer_masks, config=model.config, plan=model.plan, layers=layers, dtype=model.dtype)
        return np.asarray(out)

    def head_chunks(self, model: JaxModel, hidden: np.ndarray, *, chunk_tokens: int = 512
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """(start, float32 logits) per ``chunk_tokens`` positions of the residual stream after the last block
        (Backend.head_chunks): final norm, head and soft-cap, as logit_chunks does after its backbone."""
        chunk = check_head_chunks(model.config, model.resident, chunk_tokens)
        if model.resident is None:
            _require_weights(model)
        with model._precision():
            normed = _jit_final_norm(model.params["model"]["norm"]["weight"], self._placed_stream(model, hidden),
                                     config=model.config, dtype=model.dtype)
        head = {"model": {"embed_tokens": model.params["model"]["embed_tokens"]}}  # only what the head reads
        if "lm_head" in model.params:
            head["lm_head"] = model.params["lm_head"]
        return self._head_chunks(model, normed, chunk, head)

    @staticmethod
    def _placed_stream(model: JaxModel, stream: np.ndarray) -> jax.Array:
        """A host residual stream [batch, seq, hidden] (run_layers' output) on the devices, batch-sharded, in
        the model's residual dtype."""
        stream = np.asarray(stream).astype(residual_dtype(jnp.dtype(numpy_dtype(model.dtype))), copy=False)
        return jax.device_put(stream, model.plan.batch_sharding(stream.shape))

    def _head_chunks(self, model: JaxModel, hidden: jax.Array, chunk: int, params: Params | None = None
                     ) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, hidden.shape[1], chunk):
            with model._precision():
                logits = _jit_head_logits(model.params if params is None else params, hidden[:, start : start + chunk],
                                          config=model.config, plan=model.plan)
            yield start, self._checked(model, np.asarray(logits))  # [batch, n, vocab]

    def weights(self, model: JaxModel) -> dict[str, np.ndarray]:
        """Every canonical parameter under its canonical name, in the model's dtype (gathered from its
        shards); the tied head once, as model.embed_tokens.weight; a wrapped linear as its wrapper's fused
        dense weight (linears.py), and nothing else of the wrapper."""
        _require_weights(model)
        return {name: np.asarray(array) for name, array in linears.dense_weights(model).items()}

    def num_parameters(self, model: JaxModel) -> int:
        """Elements of the arrays the parameter tree holds (``parameter_shapes``; read from shapes:
        shape-only models count too): the tied matrix once, a wrapped linear's base weight and its
        wrapper's own arrays (so a wrapped model counts more than its config's ``num_parameters``)."""
        return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(model.params))

    def parameter_shapes(self, model: JaxModel) -> dict[str, tuple[int, ...]]:
        """Every array of the parameter tree by name, with its shape: the canonical names, except that a
        wrapped linear's weight is ``<linear>.base.weight`` beside its wrapper's ``<linear>.<field>``."""
        return {name: tuple(leaf.shape) for name, leaf in linears.named_parameters(model).items()}

    def parameters(self, model: JaxModel, names: Collection[str]) -> dict[str, np.ndarray]:
        """The parameters ``names`` (of ``parameter_shapes``) as numpy copies in the model's dtype (gathered
        from their shards)."""
        _require_weights(model)
        held = linears.named_parameters(model)
        return {name: np.array(held[name]) for name in checked_parameter_names(held, names)}

    def wrap(self, model: JaxModel, names: Collection[str], kind: str, **options: Any) -> list[str]:
        """Wrap the linears ``names`` (exact names) with the wrapper ``kind`` (gemmalab.linears.WRAPPER_KINDS),
        built with ``options``; returns the names wrapped."""
        cls = WRAPPERS[check_kind(kind)]
        return list(linears.wrap(model, names, lambda base: cls.from_base(base, **options),
                                 stack=kind in STACKING_KINDS))

    def fuse(self, model: JaxModel) -> list[str]:
        """Fuse every wrapper back into a plain dense leaf; returns the names fused."""
        return linears.fuse(model)

    # -- generation: KV caches and incremental forward passes ----------------------------------------------
    def new_cache(self, model: JaxModel, *, batch: int, pad_lengths: list[int] | None = None) -> KVCache:
        """An empty KV cache (cache.KVCache) for ``batch`` rows fed in lock-step, placed like the model's
        activations; ``pad_lengths[r]`` left-padding tokens at the start of row r are never attended to.
        Local layers get their full ring at once; global buffers grow as tokens arrive."""
        _require_weights(model)
        batch, pad_lengths = check_cache_request(batch, pad_lengths)
        return KVCache(model.config, batch=batch, pad_lengths=pad_lengths, dtype=model.dtype, plan=model.plan)

    def extend(
        self, model: JaxModel, cache: KVCache, ids: np.ndarray, *, logits: str = "last",
        positions: np.ndarray | None = None, mask: np.ndarray | None = None, write: int | None = None,
    ) -> np.ndarray | None:
        """Feed int ids [batch, n] after everything in ``cache`` (updated in place). float32 logits:
        "last" -> [batch, vocab] (the head runs on the last position only), "all" -> [batch, n, vocab],
        "none" -> None. ``positions``, ``mask`` (over the new tokens) and ``write`` follow the core's cache
        plan (gemmalab.cache_plan) through a step compiled per shape (``planned_step``)."""
        check_logits_mode(logits)
        ids = self._ids_for_cache(model, cache, ids)
        n = ids.shape[1]
        cache.planner.request(positions=positions, mask=mask, write=write)
        extend_plan = cache.planner.take_plan(n)  # None: nothing explicit asked, the plain step serves
        if extend_plan is None:
            cache.reserve(cache.length + n)
            rope = model.rope(cache.positions(n))
            start = np.int32(cache.length)

            def run(buffers):
                return model.step(buffers, self._place_ids(model, ids), rope, start, cache.pad, mode=logits)

            out, _ = self._donated_step(model, cache, run, n, None)
        else:
            out, _ = self._planned(model, cache, ids, extend_plan, mode=logits)
        if out is None:
            return None
        return self._checked(model, np.asarray(out))

    def extend_forward(
        self, model: JaxModel, cache: KVCache, ids: np.ndarray, *, positions: np.ndarray | None = None,
        mask: np.ndarray | None = None, write: int | None = None, hidden_states: tuple[int, ...] = (),
        attentions: tuple[int, ...] = (),
    ) -> ForwardOutput:
        """``extend`` returning the logits of every new position and the captures asked for, through the
        planned step compiled with the captures as static arguments; the probabilities come back over the
        core's plan layout (gemmalab.backend.ForwardOutput): the step reads whole buffers (static shapes),
        and the columns of the slots the plan does not read (masked: probability 0) are dropped."""
        ids = self._ids_for_cache(model, cache, ids)
        n = ids.shape[1]
        extend_plan = cache.planner.plan(n, positions=positions, mask=mask, write=write)
        out, (picked, probs) = self._planned(model, cache, ids, extend_plan, mode="all",
                                             hidden_states=tuple(hidden_states), attentions=tuple(attentions))
        kinds = model.config.layer_types
        laid = {i: np.asarray(p)[..., plan_columns(extend_plan.layers[kinds[i]], p.shape[-1])]
                for i, p in probs.items()}  # [batch, heads, n, cached + n]
        return ForwardOutput(
            self._checked(model, np.asarray(out)),
            {i: np.asarray(a) for i, a in picked.items()},
            laid,
            extend_plan.key_positions(kinds, attentions),
        )

    def _ids_for_cache(self, model: JaxModel, cache: KVCache, ids: np.ndarray) -> np.ndarray:
        """Checked int32 token ids [cache.batch, n] to feed after what ``cache`` (made for ``model``)
        holds."""
        if not isinstance(cache, KVCache):
            raise InputError(f"cache must come from the jax backend's new_cache, got {type(cache).__name__}")
        ids = self._token_ids(model, ids)
        if ids.shape[0] != cache.batch:
            raise InputError(f"this cache holds {cache.batch} rows but ids have {ids.shape[0]}")
        same = cache.config is model.config or cache.config == model.config  # identity first: decoding is hot
        if not same or cache.plan != model.plan or cache.dtype != model.dtype:
            raise InputError("this cache was made for another model: make one with new_cache for this model")
        return ids

    def _planned(self, model: JaxModel, cache: KVCache, ids: np.ndarray, extend_plan: Any, *, mode: str,
                 **captures: tuple[int, ...]) -> tuple[Any, tuple[dict, dict]]:
        """The planned step of ``extend_plan``: (logits or None, (captured hidden states, probabilities))."""
        cache.reserve(cache.length + max(extend_plan.written, 1))
        rope = model.rope(extend_plan.positions)
        masks, writes = cache.planned_inputs(extend_plan)
        placed = {kind: jax.device_put(m, model.plan.batch_sharding(m.shape)) for kind, m in masks.items()}

        def run(buffers):
            out, updated, picked, probs = model.planned_step(
                buffers, self._place_ids(model, ids), rope, placed, writes, mode=mode, **captures
            )
            return (out, (picked, probs)), updated

        return self._donated_step(model, cache, run, extend_plan.written, extend_plan)[0]

    @staticmethod
    def _donated_step(
        model: JaxModel, cache: KVCache, run: Any, written: int, extend_plan: Any
    ) -> tuple[Any, Any]:
        """``run(buffers) -> (out, updated buffers)`` with the cache's buffers donated; the cache takes the
        updated ones (``written`` tokens stored, by ``extend_plan`` when there is one), or gets its own back
        when the step failed before donating them."""
        buffers = cache.take()
        try:
            out, updated = run(buffers)
        except BaseException:
            if not any(b.is_deleted() for pair in buffers for b in pair):  # failed before donating them
                cache.put(buffers, 0)
            raise
        cache.put(updated, written, extend_plan)
        model.pending = updated
        return out, updated

    def cache_nbytes(self, cache: KVCache) -> dict[str, int]:
        """Bytes of the key/value buffers, per layer type (their logical size: a sharded buffer counts once)."""
        return {"sliding_attention": 0, "full_attention": 0, **cache.nbytes()}

    def synchronize(self, model: JaxModel) -> None:
        """Wait for the last dispatched step (jax dispatches asynchronously)."""
        if model.pending is not None:
            jax.block_until_ready(model.pending)

    def peak_memory(self, model: JaxModel) -> int | None:
        """Peak bytes in use on the model's devices (summed over the mesh) where the runtime tracks them
        (GPU, TPU); None on CPU. JAX cannot reset the peak: this is the process's high-water mark."""
        stats = [device.memory_stats() for device in model.mesh.devices.flat]
        if any(s is None or "peak_bytes_in_use" not in s for s in stats):
            return None
        return int(sum(s["peak_bytes_in_use"] for s in stats))

    def reset_peak_memory(self, model: JaxModel) -> None:
        """No-op: JAX has no API to reset the peak (see peak_memory)."""

    # -- training: the tensor work of gemmalab.train (training.py) -------------------------------------------
    def trainer(self, model: JaxModel, spec: TrainSpec, companions: Mapping[str, JaxModel] | None = None, *,
                loss_parameters: Mapping[str, np.ndarray] | None = None) -> Trainer:
        """A gemmalab.train.spec.BackendTrainer for ``model`` (built in float32) following ``spec``, with the
        frozen ``companions`` its Distillation and transfer terms read and the loss parameters (projections)
        starting from ``loss_parameters`` (None: fresh ones, gemmalab.train.transfer)."""
        return Trainer(model, spec, companions, loss_parameters)

    def loss_sum(
        self,
        model: JaxModel,
        inputs: np.ndarray,
        targets: np.ndarray,
        weights: np.ndarray,
        *,
        chunk_tokens: int = LOSS_CHUNK_TOKENS,
        label_smoothing: float = 0.0,
    ) -> float:
        """sum(weights * token cross-entropy) of next-token targets, no gradients, the head and loss run
        ``chunk_tokens`` positions at a time (the loss the trainer differentiates)."""
        _require_weights(model)
        return loss_sum(
            model, inputs, targets, weights, chunk_tokens=chunk_tokens, label_smoothing=label_smoothing
        )

    # -- helpers -------------------------------------------------------------------------------------------
    @staticmethod
    def _token_ids(model: JaxModel, ids: np.ndarray) -> np.ndarray:
        _require_weights(model)
        # checked here because jnp.take does not raise on a bad index: it would read a fill value silently
        return check_token_ids(ids, model.config.vocab_size).astype(np.int32)

    @staticmethod
    def _place_ids(model: JaxModel, ids: np.ndarray) -> jax.Array:
        return jax.device_put(ids, model.plan.batch_sharding(ids.shape))

    @staticmethod
    def _checked(model: JaxModel, logits: np.ndarray) -> np.ndarray:
        if model.dtype == "float16" and not np.isfinite(logits).all():
            raise BackendError(
                "float16 overflowed inside a layer (non-finite logits): run this model in bfloat16 or float32"
            )
        return logits


def _require_weights(model: JaxModel) -> None:
    if model.resident is not None:
        raise BackendError(partial_problem())
    if model.shape_only:
        raise BackendError("this model was built shape-only (weights=None): build it with weights to compute")
