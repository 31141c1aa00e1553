"""Gemma 3 text model in JAX, one file, bottom-up: dtype helpers -> (the parameter tree, linear layers) ->
RMSNorm -> rotary embedding -> masks -> attention -> MLP -> decoder block -> text model -> causal LM and
its head.

Plain functions over a pytree of parameters (no flax): the model is a tree of arrays, not an object, so
where the PyTorch and MLX files have a class this file has a function of the same name in snake case, in
the same place (``rms_norm`` = RMSNorm, ``attention`` = Attention, ``mlp`` = MLP, ``decoder_layer`` =
DecoderLayer, ``text_model`` = Gemma3TextModel, ``forward`` = Gemma3ForCausalLM's forward), taking the
parameters and the config first. The tree is nested dicts mirroring the Hugging Face
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
rad near position 100k. The jitted functions take the cos/sin tables as inputs (``rope=``).

Attention masks are boolean [batch or 1, 1, queries, keys], True = may attend, built from positions (or
from cache indices, cache.py), one per layer type and shared by its layers; ``text_model`` takes them as
an argument, so explicit masks and position ids (block-bidirectional attention, repeated positions) need no
change here. ``hint`` callbacks name the axes of a few activations by role (batch, heads, mlp, vocab); a
sharding plan (sharding.py) turns them into layout constraints, and without one they do nothing.

Names shared with the other backends (gemmalab_torch.model, gemmalab_mlx.model), in this order:
``DTYPES``, ``dtype_name``, ``rms_norm``, ``apply_rope``, ``causal_mask``, ``attention``, ``mlp``,
``decoder_layer``, ``Gemma3Output``, ``text_model``, ``soft_cap``, ``select_positions``, ``output_weight``,
``logits_from_hidden``, ``forward``. ``forward(params, config, ids, *, positions, mask, logits_at, cache,
output_hidden_states, output_attentions, output_queries_keys)`` returns a ``Gemma3Output(logits,
last_hidden_state, hidden_states, attentions, queries_keys)`` (a NamedTuple: a pytree, so jitted functions
return it); after those arguments come JAX's own: ``rope`` (the RoPE tables, made on the host: under jit
positions are traced), ``hint`` and ``remat``. JAX alone has the parameter-tree functions (``flatten``,
``unflatten``, ``rebuild``, ``abstract_params``), ``linear``, ``default_masks`` and ``layer_rope_tables``;
``rope_tables`` and ``rotate_half`` are shared with PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gemmalab.config import SLIDING, Gemma3Config, RopeSpec
from gemmalab.errors import InputError
from gemmalab.params import parameter_shapes

if TYPE_CHECKING:  # cache.py imports this file; the model only calls the caches' methods
    from .cache import KVCache, LayerCache, StepCache

Params = dict[str, Any]  # the nested parameter tree described in the module docstring
Rope = Mapping[str, tuple[jax.Array, jax.Array]]  # layer type -> (cos, sin) [batch or 1, seq, 1, head_dim]
Masks = Mapping[str, jax.Array]  # layer type -> boolean [batch or 1, 1, queries, keys]
# What a caller may pass as ``mask``: one boolean array for every layer, or one per layer type.
MaskArg = jax.Array | Masks | None
# Which sequence positions to compute logits for (see ``forward``).
PositionsArg = int | slice | jax.Array | np.ndarray | None
# hint(x, axes): x with its layout constrained; axes names each dim's role ("batch", "heads", ...) or None.
Hint = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]
# One block's captured queries [batch, heads, seq, head_dim] and keys [batch, kv_heads, seq, head_dim].
QueriesKeys = tuple[jax.Array, jax.Array]


def no_hint(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    return x


# --------------------------------------------------------------------------------------------------------
# dtype helpers
# --------------------------------------------------------------------------------------------------------
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_name(dtype: Any) -> str:
    """The gemmalab name ("float32", "bfloat16", "float16") of a JAX floating dtype."""
    for name, value in DTYPES.items():
        if jnp.dtype(value) == jnp.dtype(dtype):
            return name
    raise InputError(f"JAX dtype {dtype} is not one gemmalab computes in: use float32, bfloat16 or float16")


def _at_least_fp32(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


# --------------------------------------------------------------------------------------------------------
# The parameter tree (JAX only: the model is this tree)
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
                shape, DTYPES[dtype], sharding=sharding(name) if sharding else None
            )
            for name, shape in parameter_shapes(config).items()
        }
    )


# --------------------------------------------------------------------------------------------------------
# Linear layers (JAX only: every linear is a leaf of the tree, or a wrapper in its place)
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


def layer_rope_tables(
    config: Gemma3Config, positions: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``rope_tables`` per layer type (local layers: ``config.rope_local``, global: ``config.rope_global``)
    for integer ``positions`` [batch or 1, seq], on the host."""
    return {
        layer_type: rope_tables(
            positions, config.rope_local if layer_type == SLIDING else config.rope_global, config.head_dim
        )
        for layer_type in set(config.layer_types)
    }


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


def _layer_masks(config: Gemma3Config, positions: Any, mask: MaskArg, seq: int) -> dict[str, jax.Array]:
    """One boolean mask per layer type [batch or 1, 1, seq, seq]: ``mask`` (one array or one per layer
    type), else the built-in ones for ``positions`` (default 0 .. seq-1)."""
    if mask is None:
        pos = jnp.arange(seq)[None] if positions is None else jnp.asarray(positions)  # [batch or 1, seq]
        return default_masks(config, pos)
    masks = {}
    for layer_type in set(config.layer_types):
        layer_mask = mask.get(layer_type) if isinstance(mask, Mapping) else mask
        if layer_mask is None:
            raise InputError(f"mask has no entry for {layer_type!r} layers: give one per layer type")
        if jnp.dtype(layer_mask.dtype) != jnp.bool_:
            raise InputError(f"mask must be boolean (True = may attend), got {layer_mask.dtype}")
        if layer_mask.ndim == 2:
            layer_mask = layer_mask[None, None]  # [q, k] -> [1, 1, q, k]
        if layer_mask.ndim != 4 or layer_mask.shape[1] != 1:
            raise InputError(f"mask must have shape [batch, 1, seq, seq], got {tuple(layer_mask.shape)}")
        masks[layer_type] = layer_mask
    return masks


# --------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------
def attention(
    p: Params,
    config: Gemma3Config,
    x: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    mask: jax.Array,
    *,
    cache: LayerCache | None = None,
    hint: Hint = no_hint,
    output_attentions: bool = False,
    output_queries_keys: bool = False,
) -> tuple[jax.Array, jax.Array | None, QueriesKeys | None]:
    """Gemma 3 self-attention. x: [batch, seq, hidden] in the matmul dtype; mask: boolean [batch or 1, 1,
    seq, keys]. Keys are x's own positions, or with a layer cache what ``cache.update`` returns. Returns the
    output [batch, seq, hidden] and, when asked, the probabilities [batch, heads, seq, keys] (fp32) and the
    queries and keys of x's positions (``Gemma3Output.queries_keys``)."""
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
    # Captured before the cache: the keys of these positions, with their kv_heads heads (no GQA repeat).
    queries_keys = (q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)) if output_queries_keys else None
    if cache is not None:
        k, v = cache.update(k, v)  # [batch, keys, kv_heads, d]

    probs = None
    if output_attentions:
        out, probs = attention_with_probs(q, k, v, mask, config.attention_scale)
    else:
        # GQA: k and v keep kv_heads heads; the query heads are grouped onto them inside. fp16 attends in
        # fp32: jax's fp16 path asks for an fp16 x fp16 -> fp32 dot that XLA on CPU and TPU rejects.
        qkv = [t.astype(jnp.float32) if t.dtype == jnp.float16 else t for t in (q, k, v)]
        out = jax.nn.dot_product_attention(*qkv, mask=mask, scale=config.attention_scale).astype(x.dtype)
    out = hint(out, ("batch", None, "heads", None))  # [batch, seq, heads, d]
    out = out.reshape(batch, seq, heads * d)  # head-major, as o_proj expects
    return linear(p["o_proj"], out), probs, queries_keys


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
    x: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    mask: jax.Array,
    *,
    dtype: Any,
    cache: LayerCache | None = None,
    hint: Hint = no_hint,
    output_attentions: bool = False,
    output_queries_keys: bool = False,
) -> tuple[jax.Array, jax.Array | None, QueriesKeys | None]:
    """Norm -> attention -> norm -> add; norm -> MLP -> norm -> add (four norms, Gemma's sandwich).
    x: the residual stream [batch, seq, hidden] (fp32 in an fp16 model); ``dtype``: the matmul dtype. The
    pre-norms hand ``dtype`` to the sublayers; the post-norms return the residual's dtype. Returns x and
    the attention's captures (``attention``)."""
    eps = config.rms_norm_eps
    attn_out, probs, queries_keys = attention(
        p["self_attn"],
        config,
        rms_norm(x, p["input_layernorm"]["weight"], eps, dtype),
        rope,
        mask,
        cache=cache,
        hint=hint,
        output_attentions=output_attentions,
        output_queries_keys=output_queries_keys,
    )
    x = x + rms_norm(attn_out, p["post_attention_layernorm"]["weight"], eps, x.dtype)
    mlp_out = mlp(p["mlp"], rms_norm(x, p["pre_feedforward_layernorm"]["weight"], eps, dtype), hint)
    x = x + rms_norm(mlp_out, p["post_feedforward_layernorm"]["weight"], eps, x.dtype)
    return hint(x, ("batch", None, None)), probs, queries_keys


# --------------------------------------------------------------------------------------------------------
# Text model
# --------------------------------------------------------------------------------------------------------
class Gemma3Output(NamedTuple):
    """What a forward pass returns, on every backend (the same fields in the same order); a pytree, so
    jitted functions can return it. The capture lists are None unless asked for."""

    logits: jax.Array | None  # [batch, n, vocab], matmul dtype; n = seq unless logits_at selects; None
    # from text_model
    last_hidden_state: jax.Array  # after the final norm, [batch, seq, hidden], matmul dtype
    hidden_states: list[jax.Array] | None = None  # residual stream: embeddings, then after each block
    attentions: list[jax.Array | None] | None = None  # per block, probabilities [batch, heads, seq, keys],
    # fp32 (None where not asked)
    queries_keys: list[QueriesKeys | None] | None = None  # per block, (q [batch, heads, seq, head_dim],
    # k [batch, kv_heads, seq, head_dim]) after the q/k norms and RoPE, matmul dtype (None where not asked)


def _host_positions(positions: Any, seq: int) -> np.ndarray:
    """Positions [batch or 1, seq] as host numpy, for RoPE tables made in float64 (module docstring)."""
    if positions is None:
        return np.arange(seq)[None]  # [1, seq]: one set of tables for every row
    if isinstance(positions, jax.core.Tracer):
        raise InputError(
            "positions are traced inside jax.jit, and RoPE tables are made on the host: pass "
            "rope=JaxModel.rope(positions) (or layer_rope_tables(config, positions)) made outside the jit"
        )
    return np.asarray(positions)


def residual_dtype(dtype: Any) -> Any:
    """The residual stream's dtype for a model computing in ``dtype``: float32 in a float16 model (the fp16
    policy of the header), else the same."""
    return jnp.float32 if dtype == jnp.float16 else dtype


def embed_ids(embed: jax.Array, config: Gemma3Config, ids: jax.Array, hint: Hint = no_hint) -> jax.Array:
    """The scaled embeddings of ids [batch, seq] (the embedding matrix ``embed``): the residual stream
    entering block 0, in the residual dtype."""
    x = jnp.take(embed, ids, axis=0).astype(residual_dtype(embed.dtype))  # [batch, seq, hidden]
    return hint(x * config.embed_scale(dtype_name(embed.dtype)), ("batch", None, None))


def blocks(layer_params: list[Params], config: Gemma3Config, x: jax.Array, rope: Rope, mask: MaskArg,
           layers: range, *, dtype: Any, hint: Hint = no_hint) -> jax.Array:
    """The residual stream x [batch, seq, hidden] after the blocks ``layers`` (consecutive indices; their
    parameters ``layer_params``, in order), with RoPE tables per layer type and ``mask`` as in
    ``text_model``; no cache, no capture, no final norm. A layer-streamed model runs its passes group of
    blocks by group of blocks this way (only those blocks' parameters need be resident)."""
    masks = _layer_masks(config, None, mask, x.shape[1])
    for i, p in zip(layers, layer_params, strict=True):
        layer_type = config.layer_types[i]
        x, _, _ = decoder_layer(p, config, x, rope[layer_type], masks[layer_type], dtype=dtype, hint=hint)
    return x


def text_model(
    params: Params,
    config: Gemma3Config,
    ids: jax.Array,
    *,
    positions: jax.Array | np.ndarray | None = None,
    mask: MaskArg = None,
    cache: StepCache | KVCache | None = None,
    output_hidden_states: bool = False,
    output_attentions: bool | Collection[int] = False,
    output_queries_keys: Collection[int] = (),
    rope: Rope | None = None,
    hint: Hint = no_hint,
    remat: bool = False,
) -> Gemma3Output:
    """Embeddings, decoder blocks and the final norm (Gemma3TextModel; no output head: ``logits`` is None).

    ids: int [batch, seq]. ``positions``, ``mask``, ``cache`` and the output_* flags are ``forward``'s.
    rope: layer type -> (cos, sin) of the positions (``layer_rope_tables``, or ``JaxModel.rope`` placed on
    the mesh); default: made here on the host from ``positions``, which must then not be traced. With a
    cache (a ``cache.StepCache``, inside a jitted step) the cache gives the RoPE tables and masks, and each
    layer's keys and values go to its ``cache.layers[i]``; with the host ``cache.KVCache`` (outside a jit)
    the step runs by the core's plan (``KVCache.run_step``), keys in the plan's layout. ``remat``
    (training, no cache) rematerialises each decoder block: its backward pass reruns the block from its
    input instead of reading stored activations, so activation memory holds one block's worth plus each
    block's input.
    """
    seq = ids.shape[1]
    if cache is not None:
        # Positions, RoPE tables and masks come from the cache (what it holds decides them).
        if positions is not None or mask is not None or rope is not None:
            raise InputError(
                "a KV cache decides positions and masks: pass positions= and mask= without cache= "
                "(or give them to the backend's extend, which plans the cache for them)"
            )
        if remat:
            raise InputError("remat is for training, which runs without a KV cache: drop cache= or remat=")
        if hasattr(cache, "run_step"):
            if output_queries_keys:
                raise InputError(
                    "queries and keys are captured on passes without a host KVCache (training, extend's "
                    "jitted steps): drop output_queries_keys= or cache="
                )
            # The host-side cache.KVCache (the backend's new_cache), as PyTorch's and MLX's models take
            # theirs: it runs this function in one jitted step by the core's plan, and updates itself.
            if isinstance(ids, jax.core.Tracer):
                raise InputError(
                    "a host KVCache cannot enter jax.jit: call the model with it outside the jit, or use "
                    "the backend's extend / extend_forward (jitted steps)"
                )
            return cache.run_step(params, ids, output_hidden_states=output_hidden_states,
                                  output_attentions=output_attentions, hint=None if hint is no_hint else hint)
        rope, masks, caches = cache.rope, cache.masks, cache.layers
    else:
        if rope is None:
            rope = layer_rope_tables(config, _host_positions(positions, seq))
        masks, caches = _layer_masks(config, positions, mask, seq), None
    embed = params["model"]["embed_tokens"]["weight"]
    dtype = embed.dtype  # the matmul dtype
    x = embed_ids(embed, config, ids, hint)  # [batch, seq, hidden]
    hidden_states = [x] if output_hidden_states else None
    layers = params["model"]["layers"]
    # True = every layer's probabilities; a collection of layer indices = those layers' only (the others
    # keep the fused kernel). The list has one entry per layer, None where not captured.
    wanted = set(range(len(layers))) if output_attentions is True else set(output_attentions or ())
    attentions = [] if wanted else None
    # Queries and keys beside the fused kernel: the same collection form, one entry per layer.
    wanted_qk = set(output_queries_keys or ())
    queries_keys = [] if wanted_qk else None
    blocks = {}
    for with_probs in (False, True):
        for with_qk in (False, True):
            block = partial(decoder_layer, dtype=dtype, hint=hint, output_attentions=with_probs,
                            output_queries_keys=with_qk)
            # jax.checkpoint traces its arguments as arrays: the config stays a Python value.
            blocks[with_probs, with_qk] = jax.checkpoint(block, static_argnums=(1,)) if remat else block
    for i, p in enumerate(layers):
        layer_type = config.layer_types[i]
        args = (p, config, x, rope[layer_type], masks[layer_type])
        block = blocks[i in wanted, i in wanted_qk]
        if caches is None:
            x, probs, qk = block(*args)
        else:
            x, probs, qk = block(*args, cache=caches[i])
        if hidden_states is not None:
            hidden_states.append(x)
        if attentions is not None:
            attentions.append(probs)
        if queries_keys is not None:
            queries_keys.append(qk)
    hidden = rms_norm(x, params["model"]["norm"]["weight"], config.rms_norm_eps, dtype)
    return Gemma3Output(None, hidden, hidden_states, attentions, queries_keys)


# --------------------------------------------------------------------------------------------------------
# Causal LM and its head
# --------------------------------------------------------------------------------------------------------
def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
    """Gemma's final-logit soft-capping ``tanh(logits / cap) * cap`` (none when ``cap`` is None), in (at
    least) fp32 and rounded once to the logits' dtype."""
    if cap is None:
        return logits
    capped = jnp.tanh(logits.astype(_at_least_fp32(logits.dtype)) / cap) * cap
    return capped.astype(logits.dtype)


def select_positions(hidden: jax.Array, at: PositionsArg) -> jax.Array:
    """hidden [batch, seq, dim] -> [batch, n, dim] at the positions ``at`` (see ``forward``)."""
    if at is None:
        return hidden
    if isinstance(at, int):
        seq = hidden.shape[1]
        if not -seq <= at < seq:
            raise InputError(f"logits_at={at} is outside the {seq} positions of this input")
        return hidden[:, at : (at + 1) or None]  # [batch, 1, dim]
    if isinstance(at, slice):
        return hidden[:, at]
    if at.ndim == 1:
        return hidden[:, at]  # [batch, n, dim]
    if at.ndim == 2:
        return jnp.take_along_axis(hidden, jnp.asarray(at)[:, :, None], axis=1)  # [batch, n, dim]
    raise InputError(
        f"logits_at must be an int, a slice, or a 1-D or 2-D index array, got shape {tuple(at.shape)}"
    )


def output_weight(params: Params) -> jax.Array:
    """The [vocab, hidden] output matrix: the embedding itself when tied (the same array); for a wrapped
    lm_head, the dense weight it computes (its ``fuse()``, differentiable in its arrays)."""
    if "lm_head" not in params:
        return params["model"]["embed_tokens"]["weight"]
    p = params["lm_head"]
    return p["weight"] if isinstance(p, dict) else p.fuse()


def logits_from_hidden(
    params: Params, config: Gemma3Config, hidden: jax.Array, hint: Hint = no_hint
) -> jax.Array:
    """Output head on final-normed hidden states [..., hidden] -> logits [..., vocab] in the matmul dtype,
    soft-capped (in fp32) when the config says so. Run it only on the positions whose logits are read: the
    262k vocabulary makes it the largest matmul of the small models (callers that chunk a loss run the
    backbone once and this per chunk)."""
    if "lm_head" in params:
        logits = linear(params["lm_head"], hidden)  # [..., vocab]
    else:
        logits = hidden @ params["model"]["embed_tokens"]["weight"].T  # tied: the embedding matrix itself
    logits = hint(logits, ("batch",) + (None,) * (logits.ndim - 2) + ("vocab",))
    return soft_cap(logits, config.final_logit_softcapping)


def forward(
    params: Params,
    config: Gemma3Config,
    ids: jax.Array,
    *,
    positions: jax.Array | np.ndarray | None = None,
    mask: MaskArg = None,
    logits_at: PositionsArg = None,
    cache: StepCache | KVCache | None = None,
    output_hidden_states: bool = False,
    output_attentions: bool | Collection[int] = False,
    output_queries_keys: Collection[int] = (),
    rope: Rope | None = None,
    hint: Hint = no_hint,
    remat: bool = False,
) -> Gemma3Output:
    """Run the model (Gemma3ForCausalLM's forward) on int token ids [batch, seq].

    positions: [batch or 1, seq] integer positions; default 0..seq-1. RoPE and the built-in masks use them.
    mask: boolean, True = may attend, shape [batch or 1, 1, seq, seq] (or [seq, seq]). It replaces the
        built-in causal / sliding-window masks: one array for every layer, or a mapping
        {"sliding_attention": ..., "full_attention": ...}. Every query must be allowed some key.
    logits_at: which positions get logits: None = every position; an int (e.g. -1) = that one position,
        kept as a length-1 dim; a slice or a 1-D index array = those positions in every row; a 2-D
        [batch, n] index array = per-row positions.
    cache: a ``cache.StepCache`` (inside a jitted step of the backend's extend): ids follow what it holds,
        their keys and values are stored in it, and it decides their positions and masks. Outside a jit,
        the host ``cache.KVCache`` itself (``BACKEND.new_cache``): one step by the core's plan, which it
        records (keys in the plan's layout, gemmalab.cache_plan).
    output_hidden_states: also return the residual stream after the embeddings and after every block.
    output_attentions: also return attention probabilities: True = every block's, a collection of layer
        indices = those blocks' only (they take a non-fused, slower path; the others do not).
    output_queries_keys: a collection of layer indices (hashable, e.g. a frozenset, to be a static jit
        argument) whose queries and keys to return (``Gemma3Output.queries_keys``); those blocks keep the
        fused kernel. Not with the host ``KVCache``.
    rope, hint, remat: see ``text_model``.
    """
    out = text_model(
        params,
        config,
        ids,
        positions=positions,
        mask=mask,
        cache=cache,
        output_hidden_states=output_hidden_states,
        output_attentions=output_attentions,
        output_queries_keys=output_queries_keys,
        rope=rope,
        hint=hint,
        remat=remat,
    )
    hidden = select_positions(out.last_hidden_state, logits_at)
    return out._replace(logits=logits_from_hidden(params, config, hidden, hint))


__all__ = [
    "DTYPES",
    "Gemma3Output",
    "abstract_params",
    "apply_rope",
    "attention",
    "causal_mask",
    "decoder_layer",
    "default_masks",
    "dtype_name",
    "flatten",
    "forward",
    "layer_rope_tables",
    "linear",
    "logits_from_hidden",
    "mlp",
    "no_hint",
    "output_weight",
    "rebuild",
    "rms_norm",
    "rope_tables",
    "rotate_half",
    "select_positions",
    "soft_cap",
    "text_model",
    "unflatten",
]
