"""Names of the floating-point types gemmalab computes in, and their numpy forms.

numpy has no bfloat16 of its own; ``ml_dtypes`` (from the JAX team) supplies it, so bf16 weights can cross
the numpy boundary between the core and a backend without a lossy detour through float32.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .errors import InputError

FLOAT32 = "float32"
BFLOAT16 = "bfloat16"
FLOAT16 = "float16"
DTYPES = (FLOAT32, BFLOAT16, FLOAT16)

_ALIASES = {
    "float32": FLOAT32, "fp32": FLOAT32, "f32": FLOAT32, "float": FLOAT32,
    "bfloat16": BFLOAT16, "bf16": BFLOAT16,
    "float16": FLOAT16, "fp16": FLOAT16, "f16": FLOAT16, "half": FLOAT16,
}

_NUMPY = {FLOAT32: np.dtype(np.float32), BFLOAT16: np.dtype(ml_dtypes.bfloat16), FLOAT16: np.dtype(np.float16)}

BYTES_PER_ELEMENT = {FLOAT32: 4, BFLOAT16: 2, FLOAT16: 2}


def canonical_dtype(name: object) -> str:
    """Map 'bf16', 'torch.bfloat16', np.float32 ... onto one of DTYPES, or raise InputError."""
    if isinstance(name, np.dtype) or (isinstance(name, type) and issubclass(name, np.generic)):
        name = np.dtype(name).name
    key = str(name).lower().removeprefix("torch.").removeprefix("mlx.core.").removeprefix("jnp.")
    if key in _ALIASES:
        return _ALIASES[key]
    raise InputError(f"unknown dtype {name!r}: use one of float32 (fp32), bfloat16 (bf16), float16 (fp16)")


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a gemmalab dtype name (bfloat16 through ml_dtypes)."""
    return _NUMPY[canonical_dtype(name)]


def round_to(value: float, name: str) -> float:
    """``value`` rounded to the precision of ``name`` and returned as a Python float.

    Gemma scales embeddings by sqrt(hidden_size); transformers first casts that scalar to the weights'
    dtype, so in bf16 the 270M's sqrt(640) = 25.298 becomes 25.25. Matching it is part of being exact.
    """
    return float(np.asarray(value, dtype=np.float64).astype(numpy_dtype(name)).astype(np.float64))
