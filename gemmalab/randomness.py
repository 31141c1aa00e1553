"""Seeded random streams named by what they initialise, so adding or removing one leaves the others' draws
as they were (a run's loss projections, its LoRA adapters)."""

from __future__ import annotations

import hashlib

import numpy as np


def named_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of ``name`` under ``seed``: the whole name hashed with sha256 (not Python's hash(), which
    changes between processes), so the same (seed, name) draws the same numbers on every run and host."""
    name_seed = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, name_seed])


__all__ = ["named_rng"]
