"""The canonical parameter set of a Gemma 3 text model: names, shapes, counts, random initialisation.

Canonical names are the Hugging Face ``Gemma3ForCausalLM`` names (``model.layers.3.self_attn.q_proj.weight``
...). Backends name their parameters the same way, so loading a checkpoint is a key map and never a
translation. The tied output head is the embedding matrix: there is no ``lm_head.weight`` unless the
config unties it.
"""

from __future__ import annotations

import math

import numpy as np

from .config import Gemma3Config
from .dtypes import numpy_dtype

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def layer_parameter_shapes(config: Gemma3Config, layer: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one decoder block's parameters. Linear weights are [out_features, in_features]."""
    h, d = config.hidden_size, config.head_dim
    q, kv, m = config.num_attention_heads * d, config.num_key_value_heads * d, config.intermediate_size
    p = layer_prefix(layer)
    return {
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "self_attn.q_norm.weight": (d,),
        p + "self_attn.k_norm.weight": (d,),
        p + "mlp.gate_proj.weight": (m, h),
        p + "mlp.up_proj.weight": (m, h),
        p + "mlp.down_proj.weight": (h, m),
        **{p + f"{norm}.weight": (h,) for norm in BLOCK_NORMS},
    }


def parameter_shapes(config: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model, in checkpoint order, without allocating anything."""
    shapes: dict[str, tuple[int, ...]] = {EMBED: (config.vocab_size, config.hidden_size)}
    for layer in range(config.num_hidden_layers):
        shapes.update(layer_parameter_shapes(config, layer))
    shapes[FINAL_NORM] = (config.hidden_size,)
    if not config.tie_word_embeddings:
        shapes[LM_HEAD] = (config.vocab_size, config.hidden_size)
    return shapes


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def parameter_bytes(config: Gemma3Config, bytes_per_element: int) -> int:
    return sum(math.prod(s) for s in parameter_shapes(config).values()) * bytes_per_element


def init_weights(config: Gemma3Config, *, seed: int = 0, dtype: str = "float32", std: float = 0.02) -> dict[str, np.ndarray]:
    """Random weights as transformers initialises Gemma 3: normal(0, std) matrices, norm weights at zero
    (Gemma's RMSNorm multiplies by 1 + w, so zero is the identity scale). Same seed, same weights on every
    backend, because they are drawn here in numpy."""
    rng = np.random.default_rng(seed)
    target = numpy_dtype(dtype)
    weights = {}
    for name, shape in parameter_shapes(config).items():
        if is_norm(name):
            weights[name] = np.zeros(shape, dtype=target)
        else:
            weights[name] = (rng.standard_normal(shape, dtype=np.float32) * std).astype(target)
    return weights
