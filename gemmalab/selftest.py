"""A quick exactness self-test: a backend's logits against the numpy reference on a tiny random model.

``gemmalab check`` runs it for every usable backend, so a broken install or a wrong kernel shows up in
seconds, before an hour of training on a wrong model.
"""

from __future__ import annotations

import numpy as np

from .backend import get_backend
from .config import Gemma3Config
from .params import init_weights, is_norm
from .reference import forward

# fp32 logits must agree with the float64 reference to this relative error (max |diff| / max |ref|).
FP32_TOLERANCE = 1e-5


def random_test_weights(config: Gemma3Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights whose norm weights are non-zero too, so every norm is exercised."""
    weights = init_weights(config, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for name, value in weights.items():
        if is_norm(name):
            weights[name] = rng.normal(0.0, 0.3, value.shape).astype(np.float32)
    return weights


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - expected)) / np.max(np.abs(expected)))


def verify_backend(name: str, preset: str = "tiny", seq_len: int = 24) -> float:
    """Max relative error of backend ``name``'s fp32 logits against the reference (batch 2, seq > 2 windows)."""
    config = Gemma3Config.preset(preset)
    weights = random_test_weights(config)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, seq_len))
    backend = get_backend(name)
    model = backend.build(config, weights, dtype="float32", device="cpu" if "cpu" in backend.devices() else None)
    return relative_error(backend.logits(model, ids), forward(config, weights, ids))
