"""The numpy reference forward pass of Gemma 3: float64, plain loops over layers, no cleverness.

This is the executable specification: every backend is tested against it. It computes every position's
logits, materialises every attention matrix and keeps nothing between calls. Read it top to bottom to
see every Gemma 3 detail in one place:

1. embeddings scaled by sqrt(hidden_size);
2. per block: RMSNorm -> attention -> RMSNorm -> residual add -> RMSNorm -> gated GELU-tanh MLP -> RMSNorm
   -> residual add (four norms per block; RMSNorm multiplies by (1 + w));
3. attention: q/k/v projections, RMSNorm per head on q and k (before RoPE), RoPE with the layer type's base
   and linear scaling, scores scaled by query_pre_attn_scalar ** -0.5, causal mask (or an explicit one), and
   on local layers a sliding window (query i sees key j when i - window < j <= i), GQA by repeating k/v heads;
4. final RMSNorm, output head = the embedding matrix (tied), optional final logit soft-capping.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import masks
from .cache_plan import CachePlanner
from .config import Gemma3Config
from .errors import InputError
from .params import EMBED, FINAL_NORM, LM_HEAD, layer_prefix


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(variance + eps) * (1.0 + weight)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """x: [batch, heads, seq, head_dim]; positions: [batch, seq]. HF's rotate-half layout (not interleaved)."""
    angles = positions[:, None, :, None].astype(np.float64) * inv_freq  # [batch, 1, seq, head_dim/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [batch, 1, seq, head_dim]
    return x * np.cos(angles) + rotate_half(x) * np.sin(angles)


def causal_mask(positions: np.ndarray, window: int | None) -> np.ndarray:
    """Boolean [batch, 1, seq, seq]: True where query i may attend to key j (gemmalab.masks, per head)."""
    allowed = masks.causal(positions, positions)
    if window is not None:
        allowed = allowed & masks.within_window(positions, positions, window)
    return allowed[:, None]


def attention(
    config: Gemma3Config, weights: Mapping[str, np.ndarray], layer: int, x: np.ndarray,
    positions: np.ndarray, allowed: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One attention sub-layer. Returns (output [batch, seq, hidden], probabilities [batch, heads, seq, seq])."""
    q, k, v = project_qkv(config, weights, layer, x, positions)
    return attend(config, weights, layer, q, k, v, allowed)


def project_qkv(
    config: Gemma3Config, weights: Mapping[str, np.ndarray], layer: int, x: np.ndarray, positions: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q [batch, heads, seq, d], and k, v [batch, kv_heads, seq, d]: projected, q/k normed per head and
    rotated at ``positions`` (keys are cached in this form)."""
    p = layer_prefix(layer) + "self_attn."
    batch, seq, _ = x.shape
    d, heads, kv_heads = config.head_dim, config.num_attention_heads, config.num_key_value_heads

    def project(name: str, n_heads: int) -> np.ndarray:
        out = x @ weights[p + name + ".weight"].T  # [batch, seq, n_heads * d]
        return out.reshape(batch, seq, n_heads, d).transpose(0, 2, 1, 3)  # [batch, n_heads, seq, d]

    q, k, v = project("q_proj", heads), project("k_proj", kv_heads), project("v_proj", kv_heads)
    q = rms_norm(q, weights[p + "q_norm.weight"], config.rms_norm_eps)
    k = rms_norm(k, weights[p + "k_norm.weight"], config.rms_norm_eps)
    inv_freq = config.rope(layer).inv_freq(d)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def attend(
    config: Gemma3Config, weights: Mapping[str, np.ndarray], layer: int, q: np.ndarray, k: np.ndarray,
    v: np.ndarray, allowed: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Queries [batch, heads, n, d] over keys and values [batch, kv_heads, keys, d] where ``allowed``
    [batch, 1, n, keys]; returns (output [batch, n, hidden], probabilities [batch, heads, n, keys])."""
    batch, heads, n, d = q.shape
    k = np.repeat(k, config.num_kv_groups, axis=1)  # GQA: each kv head serves num_kv_groups query heads
    v = np.repeat(v, config.num_kv_groups, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) * config.attention_scale  # [batch, heads, n, keys]
    scores = np.where(allowed, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs = probs / probs.sum(axis=-1, keepdims=True)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, n, heads * d)
    return out @ weights[layer_prefix(layer) + "self_attn.o_proj.weight"].T, probs


def mlp(config: Gemma3Config, weights: Mapping[str, np.ndarray], layer: int, x: np.ndarray) -> np.ndarray:
    p = layer_prefix(layer) + "mlp."
    gate = gelu_tanh(x @ weights[p + "gate_proj.weight"].T)
    up = x @ weights[p + "up_proj.weight"].T
    return (gate * up) @ weights[p + "down_proj.weight"].T


def forward(
    config: Gemma3Config,
    weights: Mapping[str, np.ndarray],
    ids: np.ndarray,
    *,
    positions: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    capture: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, list[np.ndarray]]]:
    """Logits [batch, seq, vocab] in float64 for token ids [batch, seq].

    ``positions`` ([seq] or [batch, seq]) default to 0..seq-1. ``mask`` (boolean [seq, seq] or
    [batch, seq, seq], True = may attend) replaces the causal rule; either way local layers add the sliding
    window from the positions (gemmalab.masks). With ``capture=True`` also returns
    {"hidden_states": [...], "attentions": [...]} in transformers' convention: the scaled embeddings, the
    output of each block but the last, then the last block's output after the final norm (layers + 1
    arrays); and each block's attention probabilities [batch, heads, query, key].
    """
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise InputError(f"token ids must have shape [batch, seq], got {ids.shape}")
    w = {name: np.asarray(value, dtype=np.float64) for name, value in weights.items()}
    batch, seq = ids.shape
    positions = masks.as_positions(positions, batch, seq)
    explicit = None if mask is None else masks.as_mask(mask, batch, seq, seq)
    eps = config.rms_norm_eps

    x = w[EMBED][ids] * np.sqrt(config.hidden_size)  # [batch, seq, hidden]
    hidden_states, attentions = [x], []
    per_type = {kind: allowed[:, None] for kind, allowed in masks.layer_masks(config, positions, explicit).items()}
    for layer in range(config.num_hidden_layers):
        p = layer_prefix(layer)
        allowed = per_type[config.layer_types[layer]]  # [batch, 1, seq, seq]: every head alike
        attn_out, probs = attention(config, w, layer, rms_norm(x, w[p + "input_layernorm.weight"], eps), positions, allowed)
        x = x + rms_norm(attn_out, w[p + "post_attention_layernorm.weight"], eps)
        mlp_out = mlp(config, w, layer, rms_norm(x, w[p + "pre_feedforward_layernorm.weight"], eps))
        x = x + rms_norm(mlp_out, w[p + "post_feedforward_layernorm.weight"], eps)
        if layer < config.num_hidden_layers - 1:
            hidden_states.append(x)
        attentions.append(probs)

    x = rms_norm(x, w[FINAL_NORM], eps)
    hidden_states.append(x)
    logits = output_head(config, w, x)
    if capture:
        return logits, {"hidden_states": hidden_states, "attentions": attentions}
    return logits


def output_head(config: Gemma3Config, w: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits of final-normed hidden states [..., hidden]: the tied embedding, soft-capped when asked."""
    head = w[EMBED] if config.tie_word_embeddings else w[LM_HEAD]
    logits = x @ head.T
    if config.final_logit_softcapping is not None:
        cap = config.final_logit_softcapping
        logits = np.tanh(logits / cap) * cap
    return logits


class CachedReference:
    """The reference forward pass through a KV cache that follows gemmalab.cache_plan exactly: the oracle
    every backend's cache is tested against. Keys are stored after q/k norm and RoPE, float64."""

    def __init__(self, config: Gemma3Config, weights: Mapping[str, np.ndarray], batch: int,
                 pad_lengths: list[int] | None = None):
        self.config = config
        self.weights = {name: np.asarray(value, dtype=np.float64) for name, value in weights.items()}
        self.planner = CachePlanner(config, batch, pad_lengths)
        shape = (batch, config.num_key_value_heads, 0, config.head_dim)
        self.keys = [np.zeros(shape) for _ in range(config.num_hidden_layers)]
        self.values = [np.zeros(shape) for _ in range(config.num_hidden_layers)]

    def extend(self, ids: np.ndarray, *, positions: np.ndarray | None = None, mask: np.ndarray | None = None,
               write: int | None = None, capture: bool = False,
               ) -> np.ndarray | tuple[np.ndarray, dict[str, list[np.ndarray]]]:
        """Logits [batch, n, vocab] of n new tokens after the cached ones (see gemmalab.cache_plan).

        With ``capture=True`` also returns, as ``forward`` does but for the new tokens only,
        {"hidden_states": [...] (layers + 1 arrays [batch, n, hidden]), "attentions": [...] (per layer,
        [batch, heads, n, cached + n] over the plan's key layout), "key_positions": [...] (per layer, the
        position each key column holds, [batch, cached + n])}."""
        ids = np.asarray(ids)
        plan = self.planner.plan(ids.shape[1], positions=positions, mask=mask, write=write)
        w, eps, config = self.weights, self.config.rms_norm_eps, self.config
        x = w[EMBED][ids] * np.sqrt(config.hidden_size)  # [batch, n, hidden]
        hidden_states, attentions, key_positions = [x], [], []
        for layer in range(config.num_hidden_layers):
            p = layer_prefix(layer)
            layer_plan = plan.layers[config.layer_types[layer]]
            q, k, v = project_qkv(config, w, layer, rms_norm(x, w[p + "input_layernorm.weight"], eps), plan.positions)
            keys = np.concatenate([self.keys[layer][:, :, layer_plan.read_slots], k], axis=2)
            values = np.concatenate([self.values[layer][:, :, layer_plan.read_slots], v], axis=2)
            attn_out, probs = attend(config, w, layer, q, keys, values, layer_plan.mask[:, None])
            x = x + rms_norm(attn_out, w[p + "post_attention_layernorm.weight"], eps)
            mlp_out = mlp(config, w, layer, rms_norm(x, w[p + "pre_feedforward_layernorm.weight"], eps))
            x = x + rms_norm(mlp_out, w[p + "post_feedforward_layernorm.weight"], eps)
            self._store(layer, layer_plan, k, v)
            if layer < config.num_hidden_layers - 1:
                hidden_states.append(x)
            attentions.append(probs)
            key_positions.append(layer_plan.key_positions)
        self.planner.commit(plan)
        x = rms_norm(x, w[FINAL_NORM], eps)
        hidden_states.append(x)
        logits = output_head(config, w, x)
        if capture:
            return logits, dict(hidden_states=hidden_states, attentions=attentions, key_positions=key_positions)
        return logits

    def _store(self, layer: int, plan, k: np.ndarray, v: np.ndarray) -> None:
        if len(plan.write_slots) == 0:
            return
        needed = int(plan.write_slots.max()) + 1
        for buffers, new in ((self.keys, k), (self.values, v)):
            buffer = buffers[layer]
            if buffer.shape[2] < needed:
                grown = np.zeros((*buffer.shape[:2], needed, buffer.shape[3]))
                grown[:, :, : buffer.shape[2]] = buffer
                buffer = grown
            buffer[:, :, plan.write_slots] = new[:, :, plan.write_tokens]
            buffers[layer] = buffer
