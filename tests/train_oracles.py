"""Independent numpy oracles for the training tests: the optimizer formulas of gemmalab/train/spec.py
written out by hand, the naive full-logits loss in float64 from the reference forward pass, and a tiny
training setup. Nothing here calls a backend or gemmalab.train, so the tests compare against it honestly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gemmalab import reference
from gemmalab.config import Gemma3Config
from gemmalab.params import init_weights


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def clip_by_global_norm(grads: dict[str, np.ndarray], max_norm: float | None) -> tuple[dict[str, np.ndarray], float]:
    """(clipped grads, norm before clipping): g *= min(1, max_norm / (norm + 1e-6))."""
    norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values())))
    if max_norm is None:
        return dict(grads), norm
    factor = min(1.0, max_norm / (norm + 1e-6))
    return {k: g * factor for k, g in grads.items()}, norm


def adamw_step(p, g, state, *, lr, t, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    """One AdamW update (torch.optim.AdamW's formula) in float64; ``state`` = {"m", "v"} updated in place."""
    b1, b2 = betas
    p = np.asarray(p, np.float64) * (1 - lr * weight_decay)
    state["m"] = b1 * state.get("m", 0.0) + (1 - b1) * g
    state["v"] = b2 * state.get("v", 0.0) + (1 - b2) * np.square(g)
    m_hat = state["m"] / (1 - b1**t)
    v_hat = state["v"] / (1 - b2**t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps)


def adafactor_step(p, g, state, *, lr, t, decay_rate=0.8, clip_threshold=1.0, eps=(1e-30, 1e-3), weight_decay=0.0,
                   beta1=None):
    """One Adafactor update (Shazeer & Stern 2018 with explicit lr, parameter scaling, and a first moment of the
    clipped update when beta1 is given) in float64."""
    p = np.asarray(p, np.float64)
    g = np.asarray(g, np.float64)
    beta2 = 1.0 - t ** (-decay_rate)
    sq = np.square(g) + eps[0]
    if g.ndim >= 2:
        state["r"] = beta2 * state.get("r", 0.0) + (1 - beta2) * sq.mean(axis=-1)
        state["c"] = beta2 * state.get("c", 0.0) + (1 - beta2) * sq.mean(axis=-2)
        r, c = state["r"], state["c"]
        v = r[..., :, None] * c[..., None, :] / r.mean(axis=-1)[..., None, None]
    else:
        state["v"] = beta2 * state.get("v", 0.0) + (1 - beta2) * sq
        v = state["v"]
    u = g / np.sqrt(v)
    u = u / max(1.0, rms(u) / clip_threshold)
    if beta1 is not None:
        state["m"] = beta1 * state.get("m", 0.0) + (1 - beta1) * u
        u = state["m"]
    scale = lr * max(eps[1], rms(p))
    return p * (1 - lr * weight_decay) - scale * u


def naive_loss_sum(logits: np.ndarray, targets: np.ndarray, weights: np.ndarray, label_smoothing: float = 0.0) -> float:
    """sum(weights * ((1-eps) * -log p(target) + eps * mean_v -log p(v))) from full logits, float64."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # [batch, seq, vocab]
    nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    smooth = -log_probs.mean(axis=-1)
    per_token = (1 - label_smoothing) * nll + label_smoothing * smooth
    return float(np.sum(per_token * weights))


def reference_loss_sum(config, weights, inputs, targets, loss_weights, label_smoothing: float = 0.0) -> float:
    """The loss of the float64 numpy reference model: the oracle for values and finite differences."""
    return naive_loss_sum(reference.forward(config, weights, inputs), targets, loss_weights, label_smoothing)


def check_directional_derivative(grads, loss_of, weights, names, seed: int = 0) -> None:
    """grads . d against the central difference of ``loss_of(float64 weights)`` along a random direction d
    over the parameters ``names``: one check of every listed gradient at once."""
    rng = np.random.default_rng(seed)
    w64 = {k: v.astype(np.float64) for k, v in weights.items()}
    direction = {name: rng.normal(size=w64[name].shape) for name in names}
    analytic = sum(float(np.sum(grads[name].astype(np.float64) * direction[name])) for name in names)
    h = 1e-6  # whole-matrix directions: larger steps leave the linear regime (1e-4 is 0.5% off)
    shifted = [{k: v + sign * h * direction[k] if k in direction else v for k, v in w64.items()} for sign in (1, -1)]
    numeric = (loss_of(shifted[0]) - loss_of(shifted[1])) / (2 * h)
    assert analytic == pytest.approx(numeric, rel=2e-3), list(names)[:2]


def tiny_setup(seed: int = 0, batch: int = 2, seq: int = 20, **overrides):
    """(config, float32 weights, inputs, targets, loss weights) on the tiny preset (6 layers, window 8, so
    seq 20 crosses it), with random norm weights and a few zero loss weights."""
    config = dataclasses.replace(Gemma3Config.preset("tiny"), **overrides)
    weights = init_weights(config, seed=seed, dtype="float32")
    rng = np.random.default_rng(seed)
    for name, value in weights.items():
        if name.endswith("norm.weight"):
            weights[name] = rng.normal(0.0, 0.3, value.shape).astype(np.float32)
    tokens = rng.integers(0, config.vocab_size, size=(batch, seq + 1)).astype(np.int32)
    loss_weights = np.ones((batch, seq), np.float32)
    loss_weights[0, :3] = 0.0
    return config, weights, tokens[:, :-1], tokens[:, 1:], loss_weights
