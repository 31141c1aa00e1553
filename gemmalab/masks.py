"""Attention masks, decided once here in numpy and used by the reference and by every backend.

A mask is boolean, True where a query may attend to a key (the convention of
``scaled_dot_product_attention``), ``[batch, queries, keys]``. Gemma 3 attends by *positions*, not by
indices: a query at position p sees a key at position q when q <= p (causal), and on local (sliding-window)
layers also when q > p - window. An explicit mask (Set Block Decoding's, say) replaces the causal rule, and
the window still applies on top of it on local layers, from the positions.
"""

from __future__ import annotations

import numpy as np

from .config import FULL, SLIDING, Gemma3Config
from .errors import InputError


def as_positions(positions: object, batch: int, seq: int) -> np.ndarray:
    """``positions`` ([seq] or [batch, seq], default 0..seq-1) as int64 [batch, seq]."""
    if positions is None:
        return np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq))
    array = np.asarray(positions)
    if not np.issubdtype(array.dtype, np.integer) or array.ndim not in (1, 2) or array.shape[-1] != seq:
        raise InputError(f"positions must be integers of shape [{seq}] or [{batch}, {seq}], got {array.dtype} {array.shape}")
    if array.ndim == 2 and array.shape[0] != batch:
        raise InputError(f"positions have {array.shape[0]} rows for a batch of {batch}")
    if array.min() < 0:
        raise InputError(f"positions must be >= 0, got {int(array.min())}")
    return np.broadcast_to(array.astype(np.int64), (batch, seq))


def as_mask(mask: object, batch: int, queries: int, keys: int) -> np.ndarray:
    """``mask`` ([queries, keys] or [batch, queries, keys], boolean) as [batch, queries, keys]."""
    array = np.asarray(mask)
    if array.dtype != np.bool_ or array.ndim not in (2, 3) or array.shape[-2:] != (queries, keys):
        raise InputError(
            f"mask must be boolean [{queries}, {keys}] or [{batch}, {queries}, {keys}] (True = may attend), "
            f"got {array.dtype} {array.shape}"
        )
    if array.ndim == 3 and array.shape[0] != batch:
        raise InputError(f"mask has {array.shape[0]} rows for a batch of {batch}")
    return np.broadcast_to(array, (batch, queries, keys))


def causal(query_positions: np.ndarray, key_positions: np.ndarray) -> np.ndarray:
    """[batch, q, k]: the key's position is not after the query's."""
    return key_positions[:, None, :] <= query_positions[:, :, None]


def within_window(query_positions: np.ndarray, key_positions: np.ndarray, window: int) -> np.ndarray:
    """[batch, q, k]: the key is one of the last ``window`` positions up to the query's (p - window < q)."""
    return key_positions[:, None, :] > query_positions[:, :, None] - window


def layer_masks(config: Gemma3Config, positions: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The mask of each layer type for one uncached pass over ``positions`` [batch, seq]: the explicit
    ``mask`` [batch, seq, seq] (else causal from the positions) on global layers, and the same with the
    sliding window on top on local layers."""
    base = causal(positions, positions) if mask is None else mask
    return {FULL: base, SLIDING: base & within_window(positions, positions, config.sliding_window)}


def check_every_query_sees_a_key(per_type: dict[str, np.ndarray]) -> None:
    """Refuse masks under which some query may attend to no key: its softmax would be 0/0."""
    for kind, allowed in per_type.items():
        empty = np.argwhere(~allowed.any(axis=-1))
        if len(empty):
            row, query = empty[0]
            raise InputError(f"the mask lets query {query} of row {row} attend to no key on {kind} layers "
                             "(the window applies on top of it): allow each query at least one key")


def set_block_training(length: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Set Block Decoding's training input layout (Gat, Ben-Hamu et al., arXiv 2509.04185, eq. 13-14, Fig. 8):
    a clean copy of ``length`` tokens, then a masked copy of the same length.

    Returns (positions [2L], mask [2L, 2L]). Positions repeat (the copy's token i sits at position i).
    Clean tokens attend causally among themselves and never to the masked copy; a masked token attends to
    the masked tokens of its own block of ``block`` (both ways) and to the clean tokens of strictly earlier
    blocks only. Local layers add their window on top (layer_masks)."""
    if length < 1 or block < 1:
        raise InputError(f"Set Block Decoding needs length >= 1 and block >= 1, got {length} and {block}")
    index = np.arange(length)
    blocks = index // block
    mask = np.zeros((2 * length, 2 * length), dtype=bool)
    mask[:length, :length] = index[None, :] <= index[:, None]  # clean -> clean: causal
    mask[length:, length:] = blocks[:, None] == blocks[None, :]  # masked -> masked: its own block
    mask[length:, :length] = blocks[None, :] < blocks[:, None]  # masked -> clean: earlier blocks only
    return np.concatenate([index, index]), mask


__all__ = ["FULL", "as_mask", "as_positions", "causal", "check_every_query_sees_a_key", "layer_masks", "set_block_training", "within_window"]
