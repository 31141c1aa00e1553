"""Which parameters train, and how fast: layer-wise learning rates and progressive unfreezing.

Both give every parameter a learning-rate multiplier (BackendTrainer.set_lr_scales); 0 freezes it.
Depth counts from the top: the final norm (and an untied output head) sit above block L-1, the embedding
below block 0.

* Layer-wise decay ``d``: block i trains at ``d ** (L - 1 - i)`` times the learning rate, the embedding
  at ``d ** L``, the final norm and head at 1 (d = 1: every layer alike).
* Progressive unfreezing every ``K`` steps by ``n`` blocks: for steps [0, K) only the top ``n`` blocks (and
  the final norm and head) train; each K steps the next ``n`` blocks below join; the embedding joins once
  every block trains. With a tied head the embedding *is* the output matrix, so it stays frozen until then.
"""

from __future__ import annotations

from ..config import Gemma3Config
from ..params import parameter_shapes


def block_of(name: str) -> int | None:
    """The decoder block index of a parameter name, None for the embedding, final norm and head."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None


def lr_scales(config: Gemma3Config, step: int, *, layer_decay: float = 1.0, unfreeze_every: int = 0,
              unfreeze_blocks: int = 1) -> dict[str, float]:
    """The learning-rate multiplier of every parameter at ``step`` (0 = frozen)."""
    layers = config.num_hidden_layers
    if unfreeze_every > 0:
        trainable_blocks = min(layers, unfreeze_blocks * (step // unfreeze_every + 1))
    else:
        trainable_blocks = layers
    lowest_trainable = layers - trainable_blocks
    scales = {}
    for name in parameter_shapes(config):
        block = block_of(name)
        if block is not None:
            scales[name] = layer_decay ** (layers - 1 - block) if block >= lowest_trainable else 0.0
        elif name.startswith("model.embed_tokens"):
            scales[name] = layer_decay**layers if trainable_blocks == layers else 0.0
        else:  # final norm, untied head
            scales[name] = 1.0
    return scales


__all__ = ["block_of", "lr_scales"]
