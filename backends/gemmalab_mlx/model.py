"""Gemma 3 text model in MLX, one file, bottom-up: dtype helpers -> RMSNorm -> rotary embedding -> masks ->
attention -> MLP -> decoder block -> text model -> causal LM and its head.

Parameter names are the Hugging Face ``Gemma3ForCausalLM`` names, so ``tree_flatten(model.parameters())``
yields exactly the canonical names of ``gemmalab.params`` and loading is a key map. The numpy reference
(``gemmalab/reference.py``) is the specification; this file matches it. Wrappers (LoRA, quantized linears,
...) replace linear modules from outside (linears.py); nothing here changes for them. The Gemma 3 choices:

* layer pattern as data: ``config.layer_types`` (5 sliding-window layers per global one in the presets);
* sliding window on local layers: query i sees key j iff ``i - window < j <= i`` (positions, not indices);
* RoPE in the rotate-half layout (``traditional=False``), per layer type: base 10k on local layers, 1M on
  global ones with linear scaling (positions divided by ``factor``, 8 on 4B/12B/27B) on global layers only;
* RMSNorm multiplies by ``(1 + w)``, computed in float32 and cast back to the input dtype, as transformers
  does (``(x.float() * rsqrt(mean(x^2) + eps) * (1 + w.float())).to(x.dtype)``); four norms per block
  (input, post-attention, pre-feedforward, post-feedforward) plus q/k norms per head *before* RoPE;
* attention scores scaled by ``query_pre_attn_scalar ** -0.5`` (not head_dim: 168 vs 128 on 27B); GQA;
* gated MLP with GELU-tanh (``gelu_pytorch_tanh``), evaluated in float32 like torch's kernel;
* embeddings scaled by sqrt(hidden_size) rounded to the embedding dtype first, as transformers rounds it
  (25.25 instead of 25.298 for the 270M in bf16);
* final RMSNorm; the tied output head *is* the embedding matrix (one array, ``lm_head`` exists only when
  ``tie_word_embeddings`` is False); optional final logit soft-capping ``tanh(x / cap) * cap``.

dtype policy. float32 and bfloat16 follow transformers: every activation, the residual stream included,
is in the weights' dtype; only norms (and the softmax, GELU) compute in float32. float16 cannot do that:
Gemma's residual stream grows past float16's largest value (65504) in the real checkpoints, so with
float16 weights the residual stream (the scaled embeddings and every block's output) stays in float32
and the norms read and write it in float32; the matmuls, attention and MLP run in float16 (the
pre-norms cast their output to float16 for them). The PyTorch backend applies the same policy.

Generation. Called with ``cache=`` (a ``gemmalab_mlx.cache.KVCache``), the model continues the sequences
the cache holds: RoPE counts on from the cache's offset (one per row under left padding), every attention
layer stores its new keys/values in its ``cache.LayerCache`` (a ring of ``sliding_window`` slots on local
layers) and attends to what that returns, under the mask the cache built for the step. ``logits_at`` (an
int, or a slice such as ``slice(-n, None)``) reaches into the last block: only the positions from the
first kept one get queries, attention output and MLP there, and the head (``keep``, internal).

Names shared with the other backends (gemmalab_torch.model, gemmalab_jax.model), in this order:
``DTYPES``, ``dtype_name``, ``RMSNorm``, ``causal_mask``, ``Attention``, ``MLP``, ``DecoderLayer``,
``Gemma3Output``, ``Gemma3TextModel``, ``soft_cap``, ``select_positions``, ``Gemma3ForCausalLM`` with
``output_weight()`` and ``logits_from_hidden(hidden)``; its ``__call__`` takes ``ids, *, positions, mask,
logits_at, cache, output_hidden_states, output_attentions, output_queries_keys`` and returns a
``Gemma3Output(logits, last_hidden_state, hidden_states, attentions, queries_keys)``. MLX alone has
``Rotary`` (mx.fast.rope where positions are implicit; the others build cos/sin tables), ``gqa_scores``
(the attention scores of grouped queries, shared with the trainer's attention transfer) and, internal,
``Capture`` (how a forward pass records what the output_* flags ask for) and ``Gemma3TextModel.run`` (the
text model with the ``keep`` fast path).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from gemmalab.config import FULL, SLIDING, Gemma3Config, RopeSpec
from gemmalab.dtypes import FLOAT16, canonical_dtype
from gemmalab.errors import InputError

from .cache import KVCache, LayerCache

# What attention layers accept as a mask: None (no mask), "causal" (mx.fast's lower-right aligned causal
# mask) or a boolean array broadcastable to [batch, heads, queries, keys], True = may attend.
Mask = mx.array | str | None
# What a caller may pass as ``mask``: one boolean array for every layer, or one per layer type.
MaskArg = mx.array | Mapping[str, mx.array] | None
# Which sequence positions to compute logits for (see Gemma3ForCausalLM.__call__).
PositionsArg = int | slice | mx.array | np.ndarray | None


# --------------------------------------------------------------------------------------------------------
# dtype helpers
# --------------------------------------------------------------------------------------------------------
DTYPES: dict[str, mx.Dtype] = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def dtype_name(dtype: mx.Dtype) -> str:
    """The gemmalab name ("float32", "bfloat16", "float16") of an MLX floating dtype."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise InputError(f"MLX dtype {dtype} is not one gemmalab computes in: use float32, bfloat16 or float16")


# --------------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)``, all in float32, then cast.

    The result is cast to ``out_dtype`` when given, else back to the input dtype (transformers' rule).
    mx.fast.rms_norm promotes x and the weight to their common dtype, so handing it a float32 ``1 + w``
    makes it compute entirely in float32 (measured on the CPU build: bit for bit the formula above).
    Handing it a bf16 weight would round the normalised x to bf16 *before* the multiply by (1 + w), which
    is Llama's order, not Gemma's (x * w).to(dtype): see the RMSNorm note in
    https://github.com/google/gemma_pytorch/blob/main/gemma/model.py and transformers PR #29402.
    """

    def __init__(self, dims: int, eps: float, out_dtype: mx.Dtype | None = None):
        super().__init__()
        self.weight = mx.zeros((dims,))  # zero = identity scale, because the norm multiplies by 1 + w
        self.eps = eps
        self.out_dtype = out_dtype

    def __call__(self, x: mx.array) -> mx.array:
        scale = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x, scale, self.eps).astype(self.out_dtype or x.dtype)


# --------------------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------------------
class Rotary(nn.Module):
    """Rotary position embedding of one layer type, rotate-half layout (HF's, not the interleaved one).

    Without explicit positions (positions 0.. plus an optional per-sequence ``offset``) it uses
    mx.fast.rope, whose ``scale`` multiplies positions: linear scaling is ``scale = 1 / factor``. Explicit
    position ids [batch, seq] (repeated or out-of-order positions) go through cos/sin computed here in
    float32 from the float64 inverse frequencies of the config. Both paths rotate in float32 and round
    once to the input dtype.
    """

    def __init__(self, dims: int, spec: RopeSpec):
        super().__init__()
        self.dims = dims
        self.theta = spec.theta
        self.factor = spec.factor
        # float64 numpy [dims/2]: a plain attribute (not an mx.array: no parameter, no allocation).
        self.inv_freq = spec.inv_freq(dims)

    def __call__(
        self, x: mx.array, positions: mx.array | None = None, offset: int | mx.array = 0
    ) -> mx.array:
        # x: [batch, heads, seq, dims]
        if positions is None:
            scale = 1.0 / self.factor
            xf = x.astype(mx.float32)
            out = mx.fast.rope(xf, self.dims, traditional=False, base=self.theta, scale=scale, offset=offset)
            return out.astype(x.dtype)
        inv_freq = mx.array(self.inv_freq, dtype=mx.float32)
        angles = positions[:, None, :, None].astype(mx.float32) * inv_freq  # [batch, 1, seq, dims/2]
        cos, sin = mx.cos(angles), mx.sin(angles)
        xf = x.astype(mx.float32)
        x1, x2 = xf[..., : self.dims // 2], xf[..., self.dims // 2 :]  # each [batch, heads, seq, dims/2]
        out = mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [batch, heads, seq, dims]
        return out.astype(x.dtype)


# --------------------------------------------------------------------------------------------------------
# Attention masks
# --------------------------------------------------------------------------------------------------------
def causal_mask(q_positions: mx.array, k_positions: mx.array, window: int | None = None) -> mx.array:
    """Boolean [batch, 1, queries, keys]: True where a query may attend to a key.

    Causal by position (key position <= query position) and, with ``window``, also
    ``key position > query position - window``: the sliding window of the local layers. Positions are
    [batch, queries] and [batch, keys]; a KV cache passes the positions of the keys it holds.
    """
    q = q_positions[:, None, :, None]  # [batch, 1, queries, 1]
    k = k_positions[:, None, None, :]  # [batch, 1, 1, keys]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed


def _as_array_mask(mask: Mask, queries: int, keys: int) -> mx.array | None:
    """An explicit boolean mask for the non-fused path, which cannot take the "causal" string."""
    if not isinstance(mask, str):
        return mask
    # mx.fast's "causal" aligns the last query with the last key (lower-right).
    q = mx.arange(keys - queries, keys)[None]  # [1, queries]
    return causal_mask(q, mx.arange(keys)[None])


def _last_rows(mask: Mask, rows: int | None) -> Mask:
    """The mask of the last ``rows`` queries. "causal" stays "causal": mx.fast aligns it lower-right."""
    if rows is None or not isinstance(mask, mx.array) or mask.ndim < 2 or mask.shape[-2] == 1:
        return mask  # all queries, no array, or a query axis that broadcasts
    return mask[..., -rows:, :]


# --------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------
def gqa_scores(q: mx.array, k: mx.array, scale: float) -> mx.array:
    """Attention scores ``(q * scale) @ k^T`` [batch, heads, queries, keys] in q's dtype, of queries
    [batch, heads, queries, d] and keys [batch, kv_heads, keys, d], each kv head serving its group of query
    heads without being repeated."""
    batch, heads, queries, d = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    # Query head h uses kv head h // groups (transformers' repeat_kv), so split heads as [kv, group].
    qg = q.reshape(batch, kv_heads, heads // kv_heads, queries, d)  # [batch, kv_heads, groups, queries, d]
    kt = k[:, :, None].swapaxes(-1, -2)  # [batch, kv_heads, 1, d, keys]
    scores = (qg * scale) @ kt  # [batch, kv_heads, groups, queries, keys]
    return scores.reshape(batch, heads, queries, keys)


class Attention(nn.Module):
    """Grouped-query self-attention with q/k RMSNorm per head, RoPE, and Gemma's query_pre_attn_scalar."""

    def __init__(self, config: Gemma3Config, layer: int):
        super().__init__()
        hidden, d = config.hidden_size, config.head_dim
        self.layer = layer  # its index, for captures that name layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d
        self.scale = config.attention_scale  # query_pre_attn_scalar ** -0.5
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=False)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.rope = Rotary(d, config.rope(layer))

    def __call__(
        self,
        x: mx.array,
        positions: mx.array | None,
        mask: Mask,
        capture: Capture | None = None,
        cache: LayerCache | None = None,
        keep: int | None = None,
    ) -> mx.array:
        """``keep``: compute the output of the last ``keep`` positions only (all when None); keys and values
        still come from every position. ``mask`` then has rows for the kept queries only."""
        batch, seq, _ = x.shape
        nq = seq if keep is None else keep
        first = seq - nq  # index of the first query position
        xq = x[:, first:] if first else x  # [batch, nq, hidden]
        q = self.q_proj(xq).reshape(batch, nq, self.num_heads, self.head_dim)  # [batch, nq, heads, d]
        k = self.k_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)  # [batch, seq, kv_heads, d]
        v = self.v_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        # Norm per head, then heads first: [batch, (kv_)heads, seq, d].
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(k).transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 1, 3)
        if cache is None:
            q = self.rope(q, None if positions is None else positions[:, first:], offset=first)
            k = self.rope(k, positions)
        else:
            # Incremental: positions count on from the cache's offset (one per row when left-padded), or are
            # the ones a planned step gives; then attend to the cached keys and the new ones, laid out as the
            # cache says (its mask matches).
            if cache.positions is not None:
                q = self.rope(q, cache.positions[:, first:])
                k = self.rope(k, cache.positions)
            else:
                q = self.rope(q, offset=cache.offset + first)
                k = self.rope(k, offset=cache.offset)
        if capture is not None and capture.wants_queries_keys(self.layer):
            # This call's queries and keys as the scores see them (normed, rotated), before the cache joins
            # older keys and before any GQA repeat; the fused kernel below still computes the output.
            capture.queries_keys[self.layer] = (q, k)
        if cache is not None:
            k, v = cache.update(k, v)  # [batch, kv_heads, keys, d]

        if capture is not None and capture.wants_attention(self.layer):
            out, probs = self._attention_with_probs(q, k, v, mask)
            capture.attentions[self.layer] = probs
        else:
            # Fused kernel; takes GQA directly (k/v are not repeated to the query heads).
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        out = out.transpose(0, 2, 1, 3)  # [batch, nq, heads, d]
        out = out.reshape(batch, nq, self.num_heads * self.head_dim)  # [batch, nq, heads * d]
        return self.o_proj(out)

    def _attention_with_probs(
        self, q: mx.array, k: mx.array, v: mx.array, mask: Mask
    ) -> tuple[mx.array, mx.array]:
        """Attention with the probabilities materialised (float32), for capture and analysis."""
        batch, heads, queries, d = q.shape
        keys, groups = k.shape[2], self.num_heads // self.num_kv_heads
        scores = gqa_scores(q, k, self.scale).astype(mx.float32)  # [batch, heads, q, keys]
        allowed = _as_array_mask(mask, queries, keys)
        if allowed is not None:
            scores = mx.where(allowed, scores, -mx.inf)
        probs = mx.softmax(scores, axis=-1)
        pg = probs.astype(v.dtype).reshape(batch, self.num_kv_heads, groups, queries, keys)
        out = (pg @ v[:, :, None]).reshape(batch, heads, queries, d)  # [batch, heads, queries, d]
        return out, probs


# --------------------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------------------
@partial(mx.compile, shapeless=True)
def _gelu_tanh_gate(gate: mx.array, up: mx.array) -> mx.array:
    # GELU-tanh evaluated in float32 and rounded once, as torch's gelu(approximate="tanh") does for bf16
    # and fp16; nn.gelu_approx is exactly 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))). The product with
    # `up` is in the activation dtype, as in transformers.
    return nn.gelu_approx(gate.astype(mx.float32)).astype(gate.dtype) * up


class MLP(nn.Module):
    """Gated feed-forward: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(_gelu_tanh_gate(self.gate_proj(x), self.up_proj(x)))


# --------------------------------------------------------------------------------------------------------
# Decoder block
# --------------------------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    """One block: pre-norm attention and pre-norm MLP, each output normed again before its residual add."""

    def __init__(
        self,
        config: Gemma3Config,
        layer: int,
        compute_dtype: mx.Dtype | None,
        residual_dtype: mx.Dtype | None,
    ):
        super().__init__()
        eps = config.rms_norm_eps
        self.layer_type = config.layer_types[layer]
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        # Pre-norms feed the matmuls (compute dtype); post-norms feed the residual stream (residual dtype).
        # Both are None (= input dtype) except under the float16 policy (see the module docstring).
        self.input_layernorm = RMSNorm(config.hidden_size, eps, compute_dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, residual_dtype)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, compute_dtype)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, residual_dtype)

    def __call__(
        self,
        h: mx.array,
        positions: mx.array | None,
        mask: Mask,
        capture: Capture | None = None,
        cache: LayerCache | None = None,
        keep: int | None = None,
    ) -> mx.array:
        """``keep``: return the last ``keep`` positions only (all when None), computing nothing else that
        only the other positions need (their keys and values are still computed and cached)."""
        x = self.input_layernorm(h)
        attn = self.self_attn(x, positions, _last_rows(mask, keep), capture, cache, keep)
        if keep is not None:
            h = h[:, -keep:]  # [batch, keep, hidden]
        h = h + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


# --------------------------------------------------------------------------------------------------------
# Text model
# --------------------------------------------------------------------------------------------------------
@dataclass
class Gemma3Output:
    """What a forward pass returns, on every backend (the same fields in the same order). The capture lists
    are None unless asked for."""

    logits: mx.array | None  # [batch, n, vocab] in the compute dtype; None from the text model alone
    # After the final norm [batch, seq, hidden]; when logits_at let the last block skip positions (see
    # Gemma3ForCausalLM.__call__), only the positions it computed, from the first kept one to the end.
    last_hidden_state: mx.array
    hidden_states: list[mx.array] | None = None  # residual stream: embeddings, then after each block
    attentions: list[mx.array | None] | None = None  # per block, probabilities [batch, heads, q, keys],
    # float32 (None where not asked)
    queries_keys: list[tuple[mx.array, mx.array] | None] | None = None  # per block, (q [batch, heads, seq, d],
    # k [batch, kv_heads, seq, d]) after the q/k norms and RoPE, in the matmul dtype (None where not asked)


@dataclass
class Capture:
    """How a forward pass records intermediate values (inside this file: callers pass the output_* flags).

    ``hidden_states`` gets the residual stream: the scaled embeddings, then the output of every block
    (before the final norm). ``attention`` names the layers whose attention probabilities
    [batch, heads, queries, keys] (float32) go into ``attentions``, by layer index (True = every layer):
    only those take the non-fused attention path; every other layer keeps the fused kernel. The layers in
    ``query_key`` put their queries and keys into ``queries_keys`` and keep the fused kernel. The normal
    path (no Capture) pays nothing for this.
    """

    attention: bool | Collection[int] = False
    query_key: Collection[int] = frozenset()
    hidden_states: list[mx.array] = field(default_factory=list)
    attentions: dict[int, mx.array] = field(default_factory=dict)
    queries_keys: dict[int, tuple[mx.array, mx.array]] = field(default_factory=dict)

    def wants_attention(self, layer: int) -> bool:
        return self.attention is True or (not isinstance(self.attention, bool) and layer in self.attention)

    def wants_queries_keys(self, layer: int) -> bool:
        return layer in self.query_key

    def of_block(self, layer: int) -> list[mx.array]:
        """What block ``layer`` recorded (its probabilities, then its queries and keys), as a flat list."""
        probs = [self.attentions[layer]] if layer in self.attentions else []
        return probs + list(self.queries_keys.get(layer, ()))

    def put_block(self, layer: int, values: list[mx.array]) -> None:
        """Record block ``layer``'s ``of_block`` list (the outputs of its rematerialised call)."""
        if self.wants_attention(layer):
            self.attentions[layer], values = values[0], values[1:]
        if self.wants_queries_keys(layer):
            self.queries_keys[layer] = (values[0], values[1])


def _checkpointed(layer: DecoderLayer, index: int, h: mx.array, positions: mx.array | None, mask: Mask,
                  capture: Capture | None, keep: int | None) -> mx.array:
    """Block ``index`` under gradient checkpointing: only its input h (and its parameters) are kept for the
    backward pass, which recomputes the rest. nn.utils.checkpoint passes the block's parameters in as
    inputs: mx.checkpoint only differentiates its inputs. What the block captures leaves the checkpointed
    function as outputs, recorded by a Capture of its own there: written into ``capture`` from inside, the
    recomputation would write it again, and no gradient would flow back from those arrays."""
    if capture is None:
        return nn.utils.checkpoint(layer)(h, positions, mask, None, None, keep)

    def block(h: mx.array, positions: mx.array | None, mask: Mask) -> list[mx.array]:
        inner = Capture(attention=capture.attention, query_key=capture.query_key)
        return [layer(h, positions, mask, inner, None, None), *inner.of_block(index)]

    out, *recorded = nn.utils.checkpoint(layer, block)(h, positions, mask)
    capture.put_block(index, recorded)
    return out


class Gemma3TextModel(nn.Module):
    """Embeddings, decoder blocks and the final norm (HF's ``model.`` prefix); no output head."""

    def __init__(self, config: Gemma3Config, dtype: str):
        super().__init__()
        self.config = config
        fp16_policy = canonical_dtype(dtype) == FLOAT16
        compute_dtype = mx.float16 if fp16_policy else None
        self.residual_dtype = mx.float32 if fp16_policy else None  # None: the embedding's dtype
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [
            DecoderLayer(config, i, compute_dtype, self.residual_dtype)
            for i in range(config.num_hidden_layers)
        ]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, compute_dtype)
        # Set by training (gemmalab_mlx.training): recompute each block's activations in the backward pass
        # instead of storing them, so activation memory holds one block's input per layer.
        self.gradient_checkpointing = False

    def __call__(
        self,
        ids: mx.array,
        *,
        positions: mx.array | None = None,
        mask: MaskArg = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool | Collection[int] = False,
        output_queries_keys: Collection[int] = (),
    ) -> Gemma3Output:
        """ids: [batch, seq]. See Gemma3ForCausalLM.__call__ for the arguments; ``logits`` is None."""
        return self.run(
            ids,
            positions=positions,
            mask=mask,
            cache=cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            output_queries_keys=output_queries_keys,
        )

    def run(
        self,
        ids: mx.array,
        *,
        positions: mx.array | None = None,
        mask: MaskArg = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool | Collection[int] = False,
        output_queries_keys: Collection[int] = (),
        keep: int | None = None,
    ) -> Gemma3Output:
        """``__call__`` with MLX's fast path: with ``keep`` (and no capture, which wants every position),
        the last block computes its queries, attention output and MLP for the last ``keep`` positions only
        (the other positions' work there would feed nothing but discarded logits), and
        ``last_hidden_state`` is [batch, keep, hidden]."""
        wanted = bool(output_attentions)
        attention = output_attentions if output_attentions is True else frozenset(output_attentions or ())
        query_key = frozenset(output_queries_keys)
        capture = (Capture(attention=attention, query_key=query_key)
                   if output_hidden_states or wanted or query_key else None)
        h = self.embed(ids)  # [batch, seq, hidden]
        if cache is None:
            masks = self._masks(ids.shape[1], positions, mask)
            caches: list[LayerCache | None] = [None] * len(self.layers)
        else:
            if positions is not None or mask is not None:
                raise InputError(
                    "a KV cache decides positions and masks: pass positions= and mask= without cache= "
                    "(or give them to the backend's extend, which plans the cache for them)"
                )
            masks = cache.feed(ids.shape[1])  # positions and masks of these tokens, after the cached ones
            caches = cache.layers
        if keep is not None:
            keep = min(keep, ids.shape[1])
        if capture is not None:
            capture.hidden_states.append(h)
        last = len(self.layers) - 1
        # A cache is written from inside the block, which a recomputation would do twice.
        remat = self.gradient_checkpointing and cache is None
        for i, (layer, layer_cache) in enumerate(zip(self.layers, caches, strict=True)):
            layer_keep = keep if i == last and capture is None else None
            if remat:
                h = _checkpointed(layer, i, h, positions, masks[layer.layer_type], capture, layer_keep)
            else:
                h = layer(h, positions, masks[layer.layer_type], capture, layer_cache, layer_keep)
            if capture is not None:
                capture.hidden_states.append(h)
        if keep is not None and capture is not None:
            h = h[:, -keep:]  # [batch, keep, hidden]
        hidden_states = capture.hidden_states if capture is not None and output_hidden_states else None
        attentions = queries_keys = None
        if capture is not None and wanted:  # one entry per layer, None where not captured
            attentions = [capture.attentions.get(i) for i in range(len(self.layers))]
        if capture is not None and query_key:  # likewise
            queries_keys = [capture.queries_keys.get(i) for i in range(len(self.layers))]
        return Gemma3Output(None, self.norm(h), hidden_states, attentions, queries_keys)

    def embed(self, ids: mx.array) -> mx.array:
        """The scaled embeddings of ids [batch, seq]: the residual stream entering block 0, in the residual
        dtype (float32 in a float16 model)."""
        e = self.embed_tokens(ids)  # [batch, seq, hidden]
        # sqrt(hidden) rounded to the embedding dtype first (transformers' rounding), then the product in
        # the residual dtype.
        scale = self.config.embed_scale(dtype_name(e.dtype))
        return e.astype(self.residual_dtype or e.dtype) * scale

    def blocks(self, h: mx.array, layers: range, *, positions: mx.array, mask: MaskArg = None) -> mx.array:
        """The residual stream h [batch, seq, hidden] after the blocks ``layers`` (consecutive indices), at
        ``positions`` [batch, seq] with ``mask`` as in ``__call__``; no cache, no capture, no final norm. A
        layer-streamed model runs its passes group of blocks by group of blocks this way (only those blocks'
        parameters need be resident: Backend.run_layers)."""
        masks = self._masks(h.shape[1], positions, mask)
        for i in layers:
            layer = self.layers[i]
            h = layer(h, positions, masks[layer.layer_type], None, None, None)
        return h

    def _masks(
        self, seq: int, positions: mx.array | None, mask: mx.array | Mapping[str, mx.array] | None
    ) -> dict[str, Mask]:
        """One mask per layer type, built once per forward and shared by the layers of that type."""
        if mask is not None:
            given = dict(mask) if isinstance(mask, Mapping) else {SLIDING: mask, FULL: mask}
            for layer_type in set(self.config.layer_types):
                m = given.get(layer_type)
                if m is None:
                    raise InputError(f"mask has no entry for {layer_type!r} layers: give one per layer type")
                if not isinstance(m, mx.array) or m.dtype != mx.bool_:
                    # A float/int array would be taken as an *additive* mask by mx.fast: refuse it.
                    raise InputError(
                        "mask must be a boolean mx.array (True = may attend), not an additive one"
                    )
            return given
        window = self.config.sliding_window
        if positions is None:
            # Positions 0..seq-1: the fused kernel's own causal mask, and on local layers a window mask when
            # the sequence is longer than the window (else the window hides nothing).
            pos = mx.arange(seq)[None]  # [1, seq]
            return {FULL: "causal", SLIDING: "causal" if seq <= window else causal_mask(pos, pos, window)}
        return {
            FULL: causal_mask(positions, positions),
            SLIDING: causal_mask(positions, positions, window),
        }


# --------------------------------------------------------------------------------------------------------
# Causal LM and its head
# --------------------------------------------------------------------------------------------------------
def soft_cap(logits: mx.array, cap: float | None) -> mx.array:
    """Gemma's final-logit soft-capping ``tanh(logits / cap) * cap`` (none when ``cap`` is None), in float32
    and rounded once to the logits' dtype (transformers rounds after each op in bf16)."""
    if cap is None:
        return logits
    return (mx.tanh(logits.astype(mx.float32) / cap) * cap).astype(logits.dtype)


def select_positions(hidden: mx.array, at: PositionsArg) -> mx.array:
    """hidden [batch, seq, dim] -> [batch, n, dim] at the positions ``at`` (Gemma3ForCausalLM.__call__)."""
    if at is None:
        return hidden
    if isinstance(at, int):
        seq = hidden.shape[1]
        if not -seq <= at < seq:
            raise InputError(f"logits_at={at} is outside the {seq} positions of this input")
        return hidden[:, at : (at + 1) or None]  # [batch, 1, dim]
    if isinstance(at, slice):
        return hidden[:, at]
    at = mx.array(at) if isinstance(at, np.ndarray) else at
    if at.ndim == 1:
        return hidden[:, at]  # [batch, n, dim]
    if at.ndim == 2:
        return mx.take_along_axis(hidden, at[:, :, None], axis=1)  # [batch, n, dim]
    raise InputError(
        f"logits_at must be an int, a slice, or a 1-D or 2-D index array, got shape {tuple(at.shape)}"
    )


def _kept(at: PositionsArg, seq: int) -> tuple[int | None, PositionsArg]:
    """The last block's fast path for ``logits_at``: (keep, what to select from the last ``keep``
    positions, None = all of them). An int or a step-1 slice needs the positions from its first one to the
    end only (``-1`` and ``slice(-n, None)``: exactly the last 1 or n); anything else needs them all."""
    if isinstance(at, int) and -seq <= at < seq:
        first = at % seq
        if first == 0:
            return None, at
        return seq - first, (None if first == seq - 1 else 0)
    if isinstance(at, slice) and at.step in (None, 1):
        first, stop, _ = at.indices(seq)
        if 0 < first < stop:
            return seq - first, (None if stop == seq else slice(0, stop - first))
    return None, at


class Gemma3ForCausalLM(nn.Module):
    """The Gemma 3 language model: ``model`` (embeddings, blocks, final norm) and the output head, with
    Hugging Face parameter names. ``dtype`` is fixed at construction.

    The head is the embedding matrix (``model.embed_tokens``) unless the config unties it; only then does
    an ``lm_head`` module exist. Constructing the model allocates no parameter memory: MLX initialises
    parameters lazily, and nothing here evaluates them. Load weights with ``load_weights`` (see
    ``gemmalab_mlx.backend``) before calling it.
    """

    def __init__(self, config: Gemma3Config, dtype: str = "float32"):
        super().__init__()
        self.config = config
        self.dtype = canonical_dtype(dtype)  # the gemmalab name: "float32", "bfloat16" or "float16"
        self.model = Gemma3TextModel(config, self.dtype)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.set_dtype(DTYPES[self.dtype])  # lazy casts of lazy initial values: still nothing allocated
        # Set by gemmalab_mlx.backend: the device to run on (None = MLX's default), and whether the
        # parameters are still the lazy initial values that must never be evaluated.
        self.device: mx.Device | None = None
        self.shape_only = True

    def output_weight(self) -> mx.array:
        """The [vocab, hidden] output matrix: the embedding itself when tied (the same array). A wrapped
        lm_head (linears.py) is not an nn.Linear: its matrix is the dense weight it computes, ``fuse()``."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight if isinstance(self.lm_head, nn.Linear) else self.lm_head.fuse()

    def logits_from_hidden(self, hidden: mx.array) -> mx.array:
        """Output head on final-normed hidden states [..., hidden] -> logits [..., vocab] in the compute
        dtype. Callers that chunk a loss over tokens run the backbone once and this per chunk."""
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(hidden)  # the embedding matrix itself, not a copy
        else:
            logits = self.lm_head(hidden)
        return soft_cap(logits, self.config.final_logit_softcapping)

    def __call__(
        self,
        ids: mx.array,
        *,
        positions: mx.array | None = None,
        mask: MaskArg = None,
        logits_at: PositionsArg = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool | Collection[int] = False,
        output_queries_keys: Collection[int] = (),
    ) -> Gemma3Output:
        """Run the model on int token ids [batch, seq].

        positions: position ids [batch, seq] (default 0..seq-1 per row); they drive RoPE and the built-in
            masks (causal by position, windowed on local layers), as in the reference.
        mask: boolean, True = may attend, broadcastable to [batch, heads, seq, seq]; replaces the built-in
            masks on every layer (the sliding window is then yours to include), or a mapping
            {"sliding_attention": ..., "full_attention": ...} with one mask per layer type.
        logits_at: which positions get logits (the 262k-vocab head is the largest matmul of small models):
            None = every position; an int (e.g. -1) = that one position, kept as a length-1 dim; a slice or
            a 1-D index array = those positions in every row; a 2-D [batch, n] index array = per-row
            positions. Without a capture, an int or a step-1 slice (``-1``, ``slice(-n, None)``) spares the
            last block every position before the first kept one, and ``last_hidden_state`` starts there.
        cache: a KVCache (``gemmalab_mlx.cache``): ``ids`` continue the sequences it holds, which it
            extends in place; it sets the positions and masks (causal, windowed, left padding hidden).
        output_hidden_states: also return the residual stream after the embeddings and after every block.
        output_attentions: also return attention probabilities: True = every block's, a collection of
            layer indices = those blocks' only (they take a non-fused, slower path; the others do not).
        output_queries_keys: block indices whose queries [batch, heads, seq, d] and keys [batch, kv_heads,
            seq, d] to return, after the q/k norms and RoPE, in the matmul dtype, the keys not repeated per
            GQA group (with a cache, this call's keys only); those blocks keep the fused kernel.
        """
        # A capture records every position, so it computes them all (and keeps last_hidden_state whole).
        captures = output_hidden_states or bool(output_attentions) or bool(output_queries_keys)
        keep, at = (None, logits_at) if captures else _kept(logits_at, ids.shape[1])
        out = self.model.run(
            ids,
            positions=positions,
            mask=mask,
            cache=cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            output_queries_keys=output_queries_keys,
            keep=keep,
        )
        out.logits = self.logits_from_hidden(select_positions(out.last_hidden_state, at))
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
    "Rotary",
    "causal_mask",
    "dtype_name",
    "gqa_scores",
    "select_positions",
    "soft_cap",
]
