"""Gemma 3 text model in PyTorch, one file, bottom-up: dtype helpers -> RMSNorm -> rotary embedding -> masks ->
attention -> MLP -> decoder block -> text model -> causal LM and its head.

Module and parameter names are the Hugging Face ``Gemma3ForCausalLM`` names, so ``state_dict()`` keys are
exactly gemmalab's canonical names (gemmalab/params.py) and loading a checkpoint is a key map. The
executable specification is gemmalab/reference.py; this file computes the same function. Wrappers (LoRA,
quantized linears, ...) replace linear modules from outside (linears.py); nothing here changes for them.

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
* MLP is gated GELU with the tanh approximation: ``down(gelu_tanh(gate(x)) * up(x))``;
* embeddings are multiplied by sqrt(hidden_size), rounded to the compute dtype first as HF does (in bf16
  the 270M's sqrt(640) = 25.298 becomes 25.25);
* attention scores are scaled by ``query_pre_attn_scalar ** -0.5``, which is not head_dim ** -0.5 on 27B;
* grouped-query attention: each key/value head serves ``num_attention_heads // num_key_value_heads``
  consecutive query heads;
* final RMSNorm, then the output head is the embedding matrix itself (tied: one matrix in memory, used by
  ``F.linear``; ``lm_head`` exists only when the config unties it), then optional final logit soft-capping.

Precision policy, decided per forward pass from the embedding's dtype (so ``model.half()`` just works):

* float32 and bfloat16: everything in that dtype, as transformers does it (the residual stream is bf16 in
  a bf16 model). Norms, RoPE tables and the soft-cap compute in fp32 internally, and q/k are normed and
  rotated in fp32 and rounded once (transformers rounds twice, with bf16 cos/sin tables).
* float16: weights and matmuls (projections, attention, head) are fp16, but the residual stream and every
  RMSNorm stay fp32. Gemma's residual stream grows far beyond fp16's maximum (65504) in real checkpoints,
  so an all-fp16 model produces inf, then NaN (transformers#36822). The pre-norms hand fp16 to the
  matmuls, and the post-norms take the fp16 sublayer output and return fp32 for the residual add. This is
  the fix vLLM adopted (vllm#17364). Values inside a sublayer (e.g. a gate projection) could still
  overflow fp16 on some input; that shows up as non-finite logits, which the backend reports as an error
  rather than returning.
* float64 (debugging only, not a gemmalab dtype): everything in float64, for comparisons with the reference.

Attention runs through ``F.scaled_dot_product_attention`` with an explicit boolean mask built from
positions. GQA is done by folding each key/value head's group of query heads into the query-length
dimension ([b, kv_heads, seq * groups, d]) rather than repeating keys and values: the fused kernels take
any mask in that form and nothing is copied per layer (``enable_gqa=True`` only reaches the flash and
math kernels on CUDA, and flash takes no mask). The folded mask is built once per forward.

Incremental decoding passes a ``cache.KVCache``: each attention layer hands its new keys and values to its
``cache.LayerCache`` and attends over what that returns (a growing buffer on global layers, a ring buffer
of window size on local layers); positions, RoPE tables and masks then come from the cache (cache.py).

Names shared with the other backends (gemmalab_mlx.model, gemmalab_jax.model), in this order:
``DTYPES``, ``dtype_name``, ``RMSNorm``, ``apply_rope``, ``causal_mask``, ``Attention``, ``MLP``,
``DecoderLayer``, ``Gemma3Output``, ``Gemma3TextModel``, ``soft_cap``, ``select_positions``,
``Gemma3ForCausalLM`` with ``output_weight()`` and ``logits_from_hidden(hidden)``; its forward takes
``ids, *, positions, mask, logits_at, cache, output_hidden_states, output_attentions, output_queries_keys`` and
returns a ``Gemma3Output(logits, last_hidden_state, hidden_states, attentions, queries_keys)``. ``rope_tables`` and ``rotate_half``
are shared with JAX only (MLX rotates with mx.fast.rope, its ``Rotary``); ``fold_mask`` is PyTorch's alone
(its GQA layout, see Attention).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gemmalab.config import SLIDING, Gemma3Config, RopeSpec
from gemmalab.errors import InputError

if TYPE_CHECKING:  # cache.py imports this file; the model only calls the cache's methods
    from .cache import KVCache, LayerCache

# A boolean attention mask is [batch, 1, query, key], True where the query may attend to the key. A caller
# may pass one for every layer, or one per layer type ({"sliding_attention": ..., "full_attention": ...}).
MaskArg = Tensor | Mapping[str, Tensor] | None
# Which sequence positions to compute logits for (see Gemma3ForCausalLM.forward).
PositionsArg = int | slice | Tensor | None


# --------------------------------------------------------------------------------------------------------
# dtype helpers
# --------------------------------------------------------------------------------------------------------
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """The gemmalab name ("float32", "bfloat16", "float16") of a torch floating dtype."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise InputError(f"torch dtype {dtype} is not one gemmalab computes in: use float32, bfloat16 or float16")


def residual_dtype(dtype: torch.dtype) -> torch.dtype:
    """The residual stream's dtype for a model computing in ``dtype``: float32 in a float16 model (the fp16
    policy of the header), else the same."""
    return torch.float32 if dtype == torch.float16 else dtype


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)``, in fp32, cast to ``dtype`` at the end."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # zero = identity scale, because of the (1 + w)

    def forward(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Normalise over the last dim. The output dtype defaults to the input's (transformers' rule); the
        fp16 policy asks for fp32 (post-norms feeding the residual) or fp16 (pre-norms feeding matmuls)."""
        compute = _at_least_fp32(x.dtype)
        xf = x.to(compute)
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = out * (1.0 + self.weight.to(compute))  # scale before the downcast, as Gemma does
        return out.to(x.dtype if dtype is None else dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


# --------------------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------------------
def rope_tables(
    positions: Tensor, spec: RopeSpec, head_dim: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin, each [batch, seq, 1, head_dim] in ``dtype``, for integer ``positions`` [batch, seq].

    Angles are formed in float64, the reference's precision, except on MPS, which has no float64: in fp32
    an angle near position 100k is off by up to ~0.01 rad (at 1.1k positions transformers' fp32 logits are
    1e-5 from the reference, ours 1e-6). The inverse frequencies use RopeSpec.inv_freq's formula, computed
    on the device rather than held in a buffer: ``model.to(torch.bfloat16)`` rounds floating buffers, and
    a bf16 inv_freq (as transformers' becomes under that call) ruins every angle past ~100 positions.
    """
    exact = torch.float32 if positions.device.type == "mps" else torch.float64
    exponents = torch.arange(0, head_dim, 2, dtype=exact, device=positions.device) / head_dim
    inv_freq = 1.0 / (spec.theta**exponents) / spec.factor  # [head_dim / 2]; linear scaling divides
    angles = positions.to(exact)[..., None] * inv_freq  # [batch, seq, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # [batch, seq, 1, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [batch, seq, heads, head_dim]; cos, sin: [batch, seq, 1, head_dim] (HF's rotate-half layout)."""
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------------------
# Attention masks
# --------------------------------------------------------------------------------------------------------
def causal_mask(q_positions: Tensor, k_positions: Tensor, window: int | None = None) -> Tensor:
    """Boolean [batch, 1, q, k]: True where query i may attend to key j, i.e. ``k_j <= q_i``, and on local
    layers also ``q_i - window < k_j``. Built from positions, so explicit position ids (repeated, offset,
    or from a cache) get the right mask."""
    q = q_positions[:, :, None]  # [batch, q, 1]
    k = k_positions[:, None, :]  # [batch, 1, k]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed[:, None]  # [batch, 1, q, k]


def fold_mask(mask: Tensor, groups: int) -> Tensor:
    """[batch, 1, q, k] -> [batch, 1, q * groups, k]: the mask for group-folded queries (see Attention).
    A single query's mask [batch, 1, 1, k] already broadcasts over its groups and is returned as it is."""
    batch, _, q, k = mask.shape
    if groups == 1 or q == 1:
        return mask
    return mask[:, :, :, None, :].expand(batch, 1, q, groups, k).reshape(batch, 1, q * groups, k)


# --------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Gemma 3 self-attention: projections, per-head q/k RMSNorm, RoPE, scaled dot-product attention, GQA."""

    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.groups = config.num_kv_groups
        self.head_dim = config.head_dim
        self.scale = config.attention_scale  # query_pre_attn_scalar ** -0.5, not head_dim ** -0.5
        hidden, q_dim, kv_dim = (
            config.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        self.q_proj = nn.Linear(hidden, q_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        *,
        cache: LayerCache | None = None,
        output_attentions: bool = False,
        output_queries_keys: bool = False,
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        """x: [batch, seq, hidden]; rope: cos, sin [batch or 1, seq, 1, head_dim]; mask: folded boolean
        [batch or 1, 1, seq * groups, keys], or None = every key allowed. With a layer cache ``cache``, the
        new keys and values are stored there and the queries attend over the keys it returns (keys = cached
        + new); without one, keys = the seq positions of x. Returns the output [batch, seq, hidden] and, when
        asked, the attention probabilities [batch, heads, seq, keys] (fp32, from a non-fused path) and the
        queries and keys the layer attends with, (q [batch, heads, seq, d], k [batch, kv_heads, seq, d]),
        normed and rotated, in the matmul dtype (the fused kernel stays on)."""
        batch, seq, _ = x.shape
        heads, kv_heads, groups, d = self.num_heads, self.num_kv_heads, self.groups, self.head_dim
        q = self.q_proj(x).view(batch, seq, heads, d)  # [batch, seq, heads, d]
        k = self.k_proj(x).view(batch, seq, kv_heads, d)  # [batch, seq, kv_heads, d]
        v = self.v_proj(x).view(batch, seq, kv_heads, d)  # [batch, seq, kv_heads, d]

        # Norm and rotate in (at least) fp32 -- the tables are fp32 -- then round once to the matmul dtype.
        cos, sin = rope
        q = apply_rope(self.q_norm(q, dtype=cos.dtype), cos, sin).to(v.dtype)
        k = apply_rope(self.k_norm(k, dtype=cos.dtype), cos, sin).to(v.dtype)
        # [batch, heads, seq, d] and [batch, kv_heads, seq, d]: views, no copy
        queries_keys = (q.transpose(1, 2), k.transpose(1, 2)) if output_queries_keys else None

        # GQA by folding: query head h = kv * groups + g belongs to kv head kv. Putting the groups beside the
        # sequence makes every kv head see `seq * groups` queries, so k and v are used as they are.
        q = q.view(batch, seq, kv_heads, groups, d).transpose(1, 2)  # [batch, kv_heads, seq, groups, d]
        q = q.reshape(batch, kv_heads, seq * groups, d)  # [batch, kv_heads, seq * groups, d]
        k = k.transpose(1, 2)  # [batch, kv_heads, seq, d]
        v = v.transpose(1, 2)  # [batch, kv_heads, seq, d]
        if cache is not None:
            k, v = cache.update(k, v)  # [batch, kv_heads, keys, d]: what the mask's key axis refers to

        probs = None
        if output_attentions:
            out, probs = self._attention_with_probs(q, k, v, mask)
            # [batch, kv_heads, seq * groups, keys] -> [batch, kv_heads, seq, groups, keys]
            probs = probs.view(batch, kv_heads, seq, groups, -1)
            probs = probs.permute(0, 1, 3, 2, 4).reshape(batch, heads, seq, -1)  # [batch, heads, seq, keys]
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.view(batch, kv_heads, seq, groups, d).transpose(1, 2)  # [batch, seq, kv_heads, groups, d]
        out = out.reshape(batch, seq, heads * d)  # [batch, seq, heads * d], head-major as o_proj expects
        return self.o_proj(out), probs, queries_keys

    def _attention_with_probs(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The same attention with the probabilities materialised (for capture; slower, more memory)."""
        compute = _at_least_fp32(q.dtype)
        scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * self.scale  # [batch, kv, seq * g, keys]
        if mask is not None:  # None: a cached decoding step, every key it returns allowed
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return (probs.to(v.dtype) @ v), probs


# --------------------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Gated GELU-tanh feed-forward: ``down(gelu_tanh(gate(x)) * up(x))``."""

    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


# --------------------------------------------------------------------------------------------------------
# Decoder block
# --------------------------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    """Norm -> attention -> norm -> add; norm -> MLP -> norm -> add (four norms, Gemma's sandwich)."""

    def __init__(self, config: Gemma3Config, layer: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer]
        # Registration order = canonical checkpoint order (gemmalab.params.layer_parameter_shapes).
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        *,
        dtype: torch.dtype,
        cache: LayerCache | None = None,
        output_attentions: bool = False,
        output_queries_keys: bool = False,
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        """x: the residual stream [batch, seq, hidden] (fp32 in an fp16 model); ``dtype``: the matmul dtype.
        The pre-norms hand ``dtype`` to the sublayers; the post-norms return the residual's dtype. Returns
        the new residual stream and the attention's captures (Attention.forward)."""
        attn_out, probs, queries_keys = self.self_attn(
            self.input_layernorm(x, dtype=dtype), rope, mask, cache=cache, output_attentions=output_attentions,
            output_queries_keys=output_queries_keys,
        )
        x = x + self.post_attention_layernorm(attn_out, dtype=x.dtype)
        mlp_out = self.mlp(self.pre_feedforward_layernorm(x, dtype=dtype))
        x = x + self.post_feedforward_layernorm(mlp_out, dtype=x.dtype)
        return x, probs, queries_keys


# --------------------------------------------------------------------------------------------------------
# Text model
# --------------------------------------------------------------------------------------------------------
@dataclass
class Gemma3Output:
    """What a forward pass returns, on every backend (the same fields in the same order). The capture lists
    are None unless asked for."""

    logits: Tensor | None  # [batch, n, vocab] in the compute dtype; n = seq unless logits_at selects; None
    # from the text model alone
    last_hidden_state: Tensor  # after the final norm, [batch, seq, hidden], compute dtype
    hidden_states: list[Tensor] | None = None  # residual stream: embeddings, then after each block
    attentions: list[Tensor | None] | None = None  # per block, probabilities [batch, heads, seq, keys], fp32
    # (None where not asked)
    queries_keys: list[tuple[Tensor, Tensor] | None] | None = None  # per block, (q [batch, heads, seq, d],
    # k [batch, kv_heads, seq, d]) normed and rotated, matmul dtype (None where not asked)


class Gemma3TextModel(nn.Module):
    """Embeddings, decoder blocks and the final norm (HF's ``model.`` prefix); no output head."""

    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        self.config = config
        # No padding_idx: the lookup is a pure function of the weights, as in the JAX original.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Training sets this to recompute each block's activations in the backward pass (less memory).
        self.gradient_checkpointing = False

    def forward(
        self,
        ids: Tensor,
        *,
        positions: Tensor | None = None,
        mask: MaskArg = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool | Collection[int] = False,
        output_queries_keys: Collection[int] = (),
    ) -> Gemma3Output:
        """ids: [batch, seq]. See Gemma3ForCausalLM.forward for the arguments; ``logits`` is None."""
        config = self.config
        batch, seq = ids.shape
        dtype = self.embed_tokens.weight.dtype  # the matmul dtype
        if cache is not None:
            # Positions, RoPE tables and masks come from the cache (what it holds decides them).
            if positions is not None or mask is not None:
                raise InputError(
                    "a KV cache decides positions and masks: pass positions= and mask= without cache= "
                    "(or give them to the backend's extend, which plans the cache for them)"
                )
            if batch != cache.batch or dtype != cache.dtype:
                raise InputError(
                    f"this cache holds {cache.batch} rows of {cache.dtype} but got {batch} rows for a "
                    f"{dtype} model: make a cache for this batch and model"
                )
            ropes, masks = cache.prepare(seq)  # RoPE spec -> (cos, sin); layer type -> folded mask or None
        else:
            if positions is None:
                positions = torch.arange(seq, device=ids.device).expand(batch, seq)  # [batch, seq]
            masks = self._masks(positions, mask, batch, seq)  # layer type -> folded mask
            ropes = {
                spec: rope_tables(positions, spec, config.head_dim, _at_least_fp32(dtype))
                for spec in {config.rope(i) for i in range(config.num_hidden_layers)}
            }

        x = self.embed(ids)  # [batch, seq, hidden]
        hidden_states = [x] if output_hidden_states else None
        # True = every layer's probabilities; a collection of layer indices = those layers' only (the
        # others keep the fused kernel). The list has one entry per layer, None where not captured.
        wanted = set(range(len(self.layers))) if output_attentions is True else set(output_attentions or ())
        attentions: list[Tensor | None] | None = [] if wanted else None
        with_queries_keys = set(output_queries_keys)
        queries_keys: list[tuple[Tensor, Tensor] | None] | None = [] if with_queries_keys else None
        remat = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            capture = dict(output_attentions=i in wanted, output_queries_keys=i in with_queries_keys)
            if remat:  # keep only the block's input; rerun the block when its gradient is needed
                x, probs, qk = checkpoint(
                    layer, x, ropes[config.rope(i)], masks[layer.layer_type], dtype=dtype, use_reentrant=False,
                    **capture,
                )
            else:
                x, probs, qk = layer(
                    x,
                    ropes[config.rope(i)],
                    masks[layer.layer_type],
                    dtype=dtype,
                    cache=None if cache is None else cache.layers[i],
                    **capture,
                )
            if hidden_states is not None:
                hidden_states.append(x)
            if attentions is not None:
                attentions.append(probs)
            if queries_keys is not None:
                queries_keys.append(qk)
        if cache is not None:
            cache.advance(seq)
        return Gemma3Output(None, self.norm(x, dtype=dtype), hidden_states, attentions, queries_keys)

    def embed(self, ids: Tensor) -> Tensor:
        """The scaled embeddings of ids [batch, seq]: the residual stream entering block 0, in the residual
        dtype (float32 in a float16 model)."""
        dtype = self.embed_tokens.weight.dtype
        scale = (
            self.config.embed_scale(dtype_name(dtype))
            if dtype in DTYPES.values()
            else math.sqrt(self.config.hidden_size)  # float64 (debugging) keeps sqrt exact
        )
        return self.embed_tokens(ids).to(residual_dtype(dtype)) * scale

    def blocks(self, x: Tensor, layers: range, *, positions: Tensor, mask: MaskArg = None) -> Tensor:
        """The residual stream x [batch, seq, hidden] after the blocks ``layers`` (consecutive indices), at
        ``positions`` [batch, seq] with ``mask`` as in ``forward``; no cache, no capture, no final norm. A
        layer-streamed model runs its passes group of blocks by group of blocks this way (only those blocks'
        parameters need be resident: Backend.run_layers)."""
        config = self.config
        dtype = self.embed_tokens.weight.dtype  # the matmul dtype (a shape-only parameter has one too)
        batch, seq = x.shape[:2]
        masks = self._masks(positions, mask, batch, seq)
        ropes = {spec: rope_tables(positions, spec, config.head_dim, _at_least_fp32(dtype))
                 for spec in {config.rope(i) for i in layers}}
        for i in layers:
            x, _, _ = self.layers[i](x, ropes[config.rope(i)], masks[config.layer_types[i]], dtype=dtype)
        return x

    def _masks(self, positions: Tensor, mask: MaskArg, batch: int, seq: int) -> dict[str, Tensor]:
        """One folded boolean mask per layer type present, shared by all layers of that type."""
        config = self.config
        masks = {}
        for layer_type in set(config.layer_types):
            if mask is None:
                window = config.sliding_window if layer_type == SLIDING else None
                layer_mask = causal_mask(positions, positions, window)
            else:
                layer_mask = mask[layer_type] if isinstance(mask, Mapping) else mask
                if layer_mask.dtype != torch.bool:
                    raise InputError(f"mask must be boolean (True = may attend), got {layer_mask.dtype}")
                if layer_mask.ndim == 2:
                    layer_mask = layer_mask[None, None]  # [q, k] -> [1, 1, q, k]
                if layer_mask.ndim != 4 or layer_mask.shape[1] != 1:
                    raise InputError(
                        f"mask must have shape [batch, 1, seq, seq], got {tuple(layer_mask.shape)}"
                    )
                layer_mask = layer_mask.to(positions.device).expand(batch, 1, seq, seq)
            masks[layer_type] = fold_mask(layer_mask, config.num_kv_groups)
        return masks


# --------------------------------------------------------------------------------------------------------
# Causal LM and its head
# --------------------------------------------------------------------------------------------------------
def soft_cap(logits: Tensor, cap: float | None) -> Tensor:
    """Gemma's final-logit soft-capping ``tanh(logits / cap) * cap`` (none when ``cap`` is None), in (at
    least) fp32 and rounded once to the logits' dtype."""
    if cap is None:
        return logits
    capped = torch.tanh(logits.to(_at_least_fp32(logits.dtype)) / cap) * cap
    return capped.to(logits.dtype)


def select_positions(hidden: Tensor, at: PositionsArg) -> Tensor:
    """hidden [batch, seq, dim] -> [batch, n, dim] at the positions ``at`` (see Gemma3ForCausalLM.forward)."""
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
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]  # [batch, 1]
        return hidden[rows, at]  # [batch, n, dim]
    raise InputError(
        f"logits_at must be an int, a slice, or a 1-D or 2-D index tensor, got shape {tuple(at.shape)}"
    )


class Gemma3ForCausalLM(nn.Module):
    """The Gemma 3 language model: ``model`` (embeddings, blocks, final norm) and the output head.

    The head is the embedding matrix (``model.embed_tokens.weight``) unless the config unties it; only then
    does an ``lm_head`` module exist, so ``state_dict()`` has exactly the canonical keys (until a linear is
    wrapped, linears.py: ``BACKEND.weights`` always gives them, each wrapper fused).
    """

    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3TextModel(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def output_weight(self) -> Tensor:
        """The [vocab, hidden] output matrix: the embedding itself when tied (the same storage). A wrapped
        lm_head (linears.py) is not an nn.Linear: its matrix is the dense weight it computes, ``fuse()``,
        differentiable in its parameters."""
        if self.lm_head is None:
            return self.model.embed_tokens.weight
        return self.lm_head.weight if isinstance(self.lm_head, nn.Linear) else self.lm_head.fuse()

    def logits_from_hidden(self, hidden: Tensor) -> Tensor:
        """Output head on final-normed hidden states [..., hidden] -> logits [..., vocab] in the compute
        dtype. Callers that chunk a loss over tokens run the backbone once and this per chunk."""
        # Flatten to 2-D first: on a 3-D *view* (a position slice, a loss chunk) torch's matmul can take a
        # batched path that copies the whole [vocab, hidden] matrix on every call (seen on CPU, torch 2.13).
        rows = hidden.reshape(-1, hidden.shape[-1])  # [batch * n, hidden]
        logits = (
            F.linear(rows, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(rows)
        )
        logits = logits.view(*hidden.shape[:-1], logits.shape[-1])  # [..., vocab]
        return soft_cap(logits, self.config.final_logit_softcapping)

    def forward(
        self,
        ids: Tensor,
        *,
        positions: Tensor | None = None,
        mask: MaskArg = None,
        logits_at: PositionsArg = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool | Collection[int] = False,
        output_queries_keys: Collection[int] = (),
    ) -> Gemma3Output:
        """Run the model on token ids [batch, seq].

        positions: [batch, seq] integer positions; default 0..seq-1. RoPE and the built-in masks use them.
        mask: boolean, True = may attend, shape [batch or 1, 1, seq, seq] (or [seq, seq]). It replaces the
            built-in causal / sliding-window masks: one tensor for every layer, or a mapping
            {"sliding_attention": ..., "full_attention": ...}. Every query must be allowed some key.
        logits_at: which positions get logits (the 262k-vocab head is the largest matmul of small models):
            None = every position; an int (e.g. -1) = that one position, kept as a length-1 dim; a slice or
            a 1-D index tensor = those positions in every row; a 2-D [batch, n] index tensor = per-row
            positions (e.g. the last real token of right-padded prompts).
        cache: a cache.KVCache (``BACKEND.new_cache``): ids are the tokens after those it holds, it stores
            their keys and values (in place) and decides their positions and masks; outputs cover the new
            tokens only.
        output_hidden_states: also return the residual stream after the embeddings and after every block.
        output_attentions: also return attention probabilities: True = every block's, a collection of
            layer indices = those blocks' only (they take a non-fused, slower path; the others do not).
        output_queries_keys: block indices whose queries and keys to return (normed and rotated, the keys
            before any GQA sharing), for losses that recompute attention rows themselves (attention transfer
            in query chunks); the fused kernel stays on.
        """
        out = self.model(
            ids,
            positions=positions,
            mask=mask,
            cache=cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            output_queries_keys=output_queries_keys,
        )
        out.logits = self.logits_from_hidden(select_positions(out.last_hidden_state, logits_at))
        return out


__all__ = [
    "DTYPES",
    "Attention",
    "DecoderLayer",
    "Gemma3ForCausalLM",
    "Gemma3Output",
    "Gemma3TextModel",
    "MLP",
    "RMSNorm",
    "apply_rope",
    "causal_mask",
    "dtype_name",
    "residual_dtype",
    "fold_mask",
    "rope_tables",
    "rotate_half",
    "select_positions",
    "soft_cap",
]
