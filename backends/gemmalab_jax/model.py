"""Gemma 3 text model in JAX, one file, bottom-up: RMSNorm -> RoPE -> masks -> attention -> MLP -> block ->
model.

Plain functions over a pytree of parameters (no flax). The tree is nested dicts mirroring the Hugging Face
module tree, ``{"model": {"embed_tokens": {"weight": A}, "layers": [{...}, ...], "norm": {...}}}`` (plus
``"lm_head"`` when the config unties it), so ``flatten(params)`` yields exactly gemmalab's canonical names
(gemmalab/params.py) and loading a checkpoint is a key map. Linear weights keep the HF layout
[out_features, in_features]. The executable specification is gemmalab/reference.py; this file computes
the same function.

Every linear layer goes through ``linear(p, x)``: for a plain leaf ``{"weight": W}`` it is ``x @ W.T``; a
wrapper (LoRA, a quantized linear, ...: a pytree node class put in the leaf's place by linears.py) is
called on x instead. Its arrays are leaves of the tree, so jit and grad see them like any parameter, and
nothing here changes for a wrapper.

The Gemma 3 choices, each one a place where public implementations have gone wrong:

* layer pattern is data: ``config.layer_types`` says which layers are local (sliding window) and which are
  global, 5 local : 1 global in every released checkpoint;
* sliding window on local layers: query i sees key j iff ``i - window < j <= i`` (positions, not indices);
* RoPE, rotate-half layout (not interleaved), per layer type: base 10k on local layers, base 1M on global
  layers with linear scaling (positions divided by 8) on global layers only, on 4B/12B/27B;
* q and k get their own RMSNorm per head, before RoPE;
* RMSNorm is ``x * rsqrt(mean(x^2) + eps) * (1 + w)``, computed in fp32 and only then cast (Gemma multiplies
  by the weight *before* the downcast, unlike Llama: https://github.com/huggingface/transformers/pull/29402);
* four norms per block: input, post-attention, pre-feedforward, post-feedforward;
* MLP is gated GELU with the tanh approximation: ``down(gelu_tanh(gate(x)) * up(x))``, the GELU in fp32;
* embeddings are multiplied by sqrt(hidden_size), rounded to the compute dtype first as HF does (in bf16
  the 270M's sqrt(640) = 25.298 becomes 25.25);
* attention scores are scaled by ``query_pre_attn_scalar ** -0.5``, which is not head_dim ** -0.5 on 27B;
* grouped-query attention: each key/value head serves ``num_attention_heads // num_key_value_heads``
  consecutive query heads (``jax.nn.dot_product_attention`` takes k/v with fewer heads as they are);
* final RMSNorm, then the output head is the embedding matrix itself (tied: one array in the tree, no
  ``lm_head`` entry unless the config unties it), then optional final logit soft-capping.

Precision policy (the same as the PyTorch and MLX backends), decided from the embedding's dtype:

* float32 and bfloat16: everything in that dtype, as transformers does it (the residual stream is bf16 in
  a bf16 model). Norms, GELU, softmax and the soft-cap compute in fp32 internally, and q/k are normed and
  rotated in fp32 and rounded once.
* float16: weights and matmuls are fp16, but the residual stream and every RMSNorm stay fp32. Gemma's
  residual stream grows far beyond fp16's maximum (65504) in real checkpoints, so an all-fp16 model
  produces inf, then NaN (transformers#36822). The pre-norms hand fp16 to the matmuls, the post-norms
  return fp32 for the residual add (the fix vLLM adopted, vllm#17364).

RoPE angles are formed on the host in float64, the reference's precision (``rope_tables``): JAX computes in
at most fp32 unless x64 is switched on globally, and an fp32 angle ``position * inv_freq`` is off by ~0.01
rad near position 100k. The jitted functions take the cos/sin tables as inputs.

Attention masks are boolean [batch or 1, 1, queries, keys], True = may attend, built from positions (or
from cache indices, cache.py), one per layer type and shared by its layers; ``forward`` takes them as
arguments, so explicit masks and position ids (block-bidirectional attention, repeated positions) need no
change here. ``hint`` callbacks name the axes of a few activations by role (batch, heads, mlp, vocab); a
sharding plan (sharding.py) turns them into layout constraints, and without one they do nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from functools import partial
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from gemmalab.config import SLIDING, Gemma3Config, RopeSpec
from gemmalab.params import parameter_shapes

JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

Params = dict[str, Any]  # the nested parameter tree described in the module docstring
Rope = Mapping[str, tuple[jax.Array, jax.Array]]  # layer type -> (cos, sin) [batch or 1, seq, 1, head_dim]
Masks = Mapping[str, jax.Array]  # layer type -> boolean [batch or 1, 1, queries, keys]
# hint(x, axes): x with its layout constrained; axes names each dim's role ("batch", "heads", ...) or None.
Hint = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]


def no_hint(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    return x


def dtype_name(dtype: Any) -> str:
    """The gemmalab name ("float32", "bfloat16", "float16") of a JAX floating dtype."""
    for name, value in JNP_DTYPES.items():
        if jnp.dtype(value) == jnp.dtype(dtype):
            return name
    raise ValueError(f"dtype {dtype} is not one gemmalab computes in")


def _at_least_fp32(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


# --------------------------------------------------------------------------------------------------------
# The parameter tree
# --------------------------------------------------------------------------------------------------------
def unflatten(flat: Mapping[str, Any]) -> Params:
    """Canonical dotted names -> the nested tree (numbered parts become lists: ``layers.3`` -> layers[3])."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *path, leaf = name.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value

    def lists(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {key: lists(child) for key, child in node.items()}
        if node and all(key.isdigit() for key in node):
            return [node[str(i)] for i in range(len(node))]
        return node

    return lists(tree)


def _part(key: Any) -> str:
    """One step of a tree path as a name part: a dict key, a list index, a (wrapper) node's attribute."""
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def flatten(params: Params) -> dict[str, Any]:
    """The nested tree -> {dotted name: leaf}: the canonical names, and for a wrapped linear its wrapper's
    arrays (``<linear>.base.weight``, ``<linear>.scale``, ...)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return {".".join(_part(k) for k in path): leaf for path, leaf in leaves}


def rebuild(structure: Params | Any, flat: Mapping[str, Any]) -> Params:
    """The tree of ``structure`` (a parameter tree or its jax PyTreeDef, which is hashable: a static
    argument) with the leaves ``flat`` names (``flatten``'s names). Unlike ``unflatten`` it keeps wrappers,
    which a name alone cannot rebuild."""
    treedef = structure if isinstance(structure, jax.tree_util.PyTreeDef) else jax.tree_util.tree_structure(structure)
    names = flatten(jax.tree_util.tree_unflatten(treedef, range(treedef.num_leaves)))  # name -> leaf index
    leaves = [None] * treedef.num_leaves
    for name, index in names.items():
        leaves[index] = flat[name]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def abstract_params(config: Gemma3Config, dtype: str, sharding: Callable[[str], Any] | None = None) -> Params:
    """The tree of jax.ShapeDtypeStruct: shapes and dtypes only, nothing allocated (any preset, instantly).
    ``sharding(name)`` gives each parameter's sharding, when there is one."""
    return unflatten(
        {
            name: jax.ShapeDtypeStruct(
                shape, JNP_DTYPES[dtype], sharding=sharding(name) if sharding else None
            )
            for name, shape in parameter_shapes(config).items()
        }
    )


# --------------------------------------------------------------------------------------------------------
# Linear layers
# --------------------------------------------------------------------------------------------------------
def linear(p: Any, x: jax.Array) -> jax.Array:
    """One linear layer on x [..., in]: ``x @ W.T`` for a plain leaf ``{"weight": W}`` (W [out, in]), else
    the wrapper in the leaf's place computes it (linears.Wrapper)."""
    if isinstance(p, dict):
        return x @ p["weight"].T
    return p(x)


# --------------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------------
def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype: Any = None) -> jax.Array:
    """Gemma's RMSNorm over the last dim: ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` in (at least) fp32, cast
    to ``dtype`` at the end (default: x's dtype, transformers' rule; the fp16 policy asks for fp32 or
    fp16)."""
    xf = x.astype(_at_least_fp32(x.dtype))
    out = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    out = out * (1.0 + weight.astype(xf.dtype))  # scale before the downcast, as Gemma does
    return out.astype(x.dtype if dtype is None else dtype)


# --------------------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------------------
def rope_tables(positions: np.ndarray, spec: RopeSpec, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each float32 [batch, seq, 1, head_dim], for integer ``positions`` [batch, seq]. Host
    numpy, angles in float64 (see the module docstring); linear scaling divides the frequencies."""
    angles = np.asarray(positions, dtype=np.float64)[..., None] * spec.inv_freq(head_dim)  # [b, s, d/2]
    angles = np.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [batch, seq, 1, head_dim]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [batch, seq, heads, head_dim]; cos, sin: [batch or 1, seq, 1, head_dim], HF's rotate-half layout."""
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------------------
# Attention masks
# --------------------------------------------------------------------------------------------------------
def causal_mask(q_positions: jax.Array, k_positions: jax.Array, window: int | None = None) -> jax.Array:
    """Boolean [batch, 1, q, k]: True where query i may attend to key j, i.e. ``k_j <= q_i``, and on local
    layers also ``q_i - window < k_j``. Built from positions, so explicit position ids get the right mask."""
    q = q_positions[:, :, None]  # [batch, q, 1]
    k = k_positions[:, None, :]  # [batch, 1, k]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed[:, None]  # [batch, 1, q, k]


def default_masks(config: Gemma3Config, positions: jax.Array) -> dict[str, jax.Array]:
    """The built-in masks for a sequence with ``positions`` [batch, seq]: causal, windowed on local layers."""
    return {
        layer_type: causal_mask(
            positions, positions, config.sliding_window if layer_type == SLIDING else None
        )
        for layer_type in set(config.layer_types)
    }


# --------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------
class LayerCache(Protocol):
    """What attention asks of a KV cache (cache.CacheView implements it inside the jitted step)."""

    def update(self, layer: int, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Store new k, v [batch, n, kv_heads, head_dim]; return the keys and values to attend over
        [batch, keys, kv_heads, head_dim], in the order of the cache's mask for this layer's type."""


def attention(
    p: Params,
    config: Gemma3Config,
    layer: int,
    x: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    mask: jax.Array,
    *,
    cache: LayerCache | None = None,
    hint: Hint = no_hint,
    with_probs: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Gemma 3 self-attention. x: [batch, seq, hidden] in the matmul dtype; mask: boolean [batch or 1, 1,
    seq, keys]. Keys are x's own positions, or with a cache what ``cache.update`` returns. Returns the
    output [batch, seq, hidden] and, when asked, the probabilities [batch, heads, seq, keys] (fp32)."""
    batch, seq, _ = x.shape
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = linear(p["q_proj"], x).reshape(batch, seq, heads, d)  # [batch, seq, heads, d]
    k = linear(p["k_proj"], x).reshape(batch, seq, kv_heads, d)  # [batch, seq, kv_heads, d]
    v = linear(p["v_proj"], x).reshape(batch, seq, kv_heads, d)  # [batch, seq, kv_heads, d]

    # Norm and rotate in fp32 (the tables are fp32), then round once to the matmul dtype.
    cos, sin = rope
    eps = config.rms_norm_eps
    q = apply_rope(rms_norm(q, p["q_norm"]["weight"], eps, cos.dtype), cos, sin).astype(x.dtype)
    k = apply_rope(rms_norm(k, p["k_norm"]["weight"], eps, cos.dtype), cos, sin).astype(x.dtype)
    q = hint(q, ("batch", None, "heads", None))
    k = hint(k, ("batch", None, "kv_heads", None))
    v = hint(v, ("batch", None, "kv_heads", None))
    if cache is not None:
        k, v = cache.update(layer, k, v)  # [batch, keys, kv_heads, d]

    probs = None
    if with_probs:
        out, probs = attention_with_probs(q, k, v, mask, config.attention_scale)
    else:
        # GQA: k and v keep kv_heads heads; the query heads are grouped onto them inside. fp16 attends in
        # fp32: jax's fp16 path asks for an fp16 x fp16 -> fp32 dot that XLA on CPU and TPU rejects.
        qkv = [t.astype(jnp.float32) if t.dtype == jnp.float16 else t for t in (q, k, v)]
        out = jax.nn.dot_product_attention(*qkv, mask=mask, scale=config.attention_scale).astype(x.dtype)
    out = hint(out, ("batch", None, "heads", None))  # [batch, seq, heads, d]
    out = out.reshape(batch, seq, heads * d)  # head-major, as o_proj expects
    return linear(p["o_proj"], out), probs


def attention_with_probs(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float
) -> tuple[jax.Array, jax.Array]:
    """The same attention with the probabilities materialised (for capture; slower, more memory).
    q: [b, seq, heads, d]; k, v: [b, keys, kv_heads, d]. Query head h uses kv head h // groups."""
    batch, seq, heads, d = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    qg = q.astype(jnp.float32).reshape(batch, seq, kv_heads, groups, d)  # [b, seq, kv_heads, groups, d]
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32)) * scale  # [b, kv, g, seq, keys]
    scores = jnp.where(mask[:, :, None], scores, -jnp.inf)  # mask [b, 1, 1, seq, keys]
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v)  # [b, seq, kv_heads, groups, d]
    return out.reshape(batch, seq, heads, d), probs.reshape(batch, heads, seq, -1)


# --------------------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------------------
def mlp(p: Params, x: jax.Array, hint: Hint = no_hint) -> jax.Array:
    """Gated GELU-tanh feed-forward: ``down(gelu_tanh(gate(x)) * up(x))``; the GELU in fp32."""
    gate = linear(p["gate_proj"], x)  # [batch, seq, intermediate]
    up = linear(p["up_proj"], x)
    inner = jax.nn.gelu(gate.astype(_at_least_fp32(gate.dtype)), approximate=True).astype(x.dtype) * up
    inner = hint(inner, ("batch", None, "mlp"))
    return linear(p["down_proj"], inner)


# --------------------------------------------------------------------------------------------------------
# Decoder block
# --------------------------------------------------------------------------------------------------------
def decoder_layer(
    p: Params,
    config: Gemma3Config,
    layer: int,
    x: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    mask: jax.Array,
    *,
    dtype: Any,
    cache: LayerCache | None = None,
    hint: Hint = no_hint,
    with_probs: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Norm -> attention -> norm -> add; norm -> MLP -> norm -> add (four norms, Gemma's sandwich).
    x: the residual stream [batch, seq, hidden] (fp32 in an fp16 model); ``dtype``: the matmul dtype. The
    pre-norms hand ``dtype`` to the sublayers; the post-norms return the residual's dtype."""
    eps = config.rms_norm_eps
    attn_out, probs = attention(
        p["self_attn"],
        config,
        layer,
        rms_norm(x, p["input_layernorm"]["weight"], eps, dtype),
        rope,
        mask,
        cache=cache,
        hint=hint,
        with_probs=with_probs,
    )
    x = x + rms_norm(attn_out, p["post_attention_layernorm"]["weight"], eps, x.dtype)
    mlp_out = mlp(p["mlp"], rms_norm(x, p["pre_feedforward_layernorm"]["weight"], eps, dtype), hint)
    x = x + rms_norm(mlp_out, p["post_feedforward_layernorm"]["weight"], eps, x.dtype)
    return hint(x, ("batch", None, None)), probs


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------
class Output(NamedTuple):
    """What ``forward`` returns (a pytree, so jitted functions can return it). Capture lists are None
    unless asked for."""

    hidden: jax.Array  # after the final norm, [batch, seq, hidden], matmul dtype
    hidden_states: list[jax.Array] | None = None  # residual stream: embeddings, then after each block
    attentions: list[jax.Array | None] | None = None  # per block, probabilities [batch, heads, seq, keys], fp32


def forward(
    params: Params,
    config: Gemma3Config,
    ids: jax.Array,
    rope: Rope,
    masks: Masks,
    *,
    cache: LayerCache | None = None,
    hint: Hint = no_hint,
    output_hidden_states: bool = False,
    output_attentions: bool | Collection[int] = False,
    remat: bool = False,
) -> Output:
    """Embeddings, decoder blocks and the final norm (no output head: see ``head``).

    ids: int [batch, seq]. rope: layer type -> (cos, sin) from ``rope_tables`` for the ids' positions.
    masks: layer type -> boolean [batch or 1, 1, seq, keys] (``default_masks`` for a plain sequence; a
    cache supplies its own). With a cache, keys and values are stored there and attention reads what it
    returns. The output_* flags also return the residual stream and attention probabilities
    (``output_attentions``: True = every layer, or a collection of layer indices: only those take the
    non-fused path, and the list holds None for the others); the normal path pays nothing for them. ``remat`` (training, no cache)
    rematerialises each decoder block: its backward pass reruns the block from its input instead of reading
    stored activations, so activation memory holds one block's worth plus each block's input.
    """
    embed = params["model"]["embed_tokens"]["weight"]
    dtype = embed.dtype  # the matmul dtype
    residual_dtype = jnp.float32 if dtype == jnp.float16 else dtype  # the fp16 policy (header)
    x = jnp.take(embed, ids, axis=0).astype(residual_dtype)  # [batch, seq, hidden]
    x = hint(x * config.embed_scale(dtype_name(dtype)), ("batch", None, None))
    hidden_states = [x] if output_hidden_states else None
    layers = params["model"]["layers"]
    wanted = set(range(len(layers))) if output_attentions is True else set(output_attentions or ())
    attentions = [] if wanted else None
    blocks = {}
    for with_probs in (False, True):
        block = partial(decoder_layer, dtype=dtype, cache=cache, hint=hint, with_probs=with_probs)
        # jax.checkpoint traces its arguments as arrays: the config and the layer index stay Python values.
        blocks[with_probs] = jax.checkpoint(block, static_argnums=(1, 2)) if remat else block
    for i, p in enumerate(layers):
        layer_type = config.layer_types[i]
        x, probs = blocks[i in wanted](p, config, i, x, rope[layer_type], masks[layer_type])
        if hidden_states is not None:
            hidden_states.append(x)
        if attentions is not None:
            attentions.append(probs)
    hidden = rms_norm(x, params["model"]["norm"]["weight"], config.rms_norm_eps, dtype)
    return Output(hidden, hidden_states, attentions)


def output_weight(params: Params) -> jax.Array:
    """The [vocab, hidden] output matrix: the embedding itself when tied (the same array); for a wrapped
    lm_head, the dense weight it computes (its ``fuse()``, differentiable in its arrays)."""
    if "lm_head" not in params:
        return params["model"]["embed_tokens"]["weight"]
    p = params["lm_head"]
    return p["weight"] if isinstance(p, dict) else p.fuse()


def head(params: Params, config: Gemma3Config, hidden: jax.Array, hint: Hint = no_hint) -> jax.Array:
    """Output head on final-normed hidden states [..., hidden] -> logits [..., vocab] in the matmul dtype,
    soft-capped (in fp32) when the config says so. Run it only on the positions whose logits are read: the
    262k vocabulary makes it the largest matmul of the small models."""
    if "lm_head" in params:
        logits = linear(params["lm_head"], hidden)  # [..., vocab]
    else:
        logits = hidden @ params["model"]["embed_tokens"]["weight"].T  # tied: the embedding matrix itself
    logits = hint(logits, ("batch",) + (None,) * (logits.ndim - 2) + ("vocab",))
    cap = config.final_logit_softcapping
    if cap is not None:
        capped = jnp.tanh(logits.astype(_at_least_fp32(logits.dtype)) / cap) * cap
        logits = capped.astype(logits.dtype)
    return logits


__all__ = [
    "JNP_DTYPES",
    "Output",
    "abstract_params",
    "apply_rope",
    "attention",
    "causal_mask",
    "decoder_layer",
    "default_masks",
    "flatten",
    "forward",
    "head",
    "linear",
    "mlp",
    "no_hint",
    "output_weight",
    "rebuild",
    "rms_norm",
    "rope_tables",
    "unflatten",
]
