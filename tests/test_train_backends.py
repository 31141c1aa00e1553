"""Each backend's training tensor work against independent oracles (tests/train_oracles.py): optimizer
steps against the numpy formulas, gradients against finite differences of the float64 reference, the
chunked loss against the naive one, accumulation against one large batch, and state round trips."""

from __future__ import annotations

import numpy as np
import pytest
from train_oracles import adafactor_step, adamw_step, clip_by_global_norm, reference_loss_sum, tiny_setup

from gemmalab.backend import get_backend
from gemmalab.train.losses import CrossEntropy, LossSpec
from gemmalab.train.spec import OptimizerSpec, TrainSpec

UP = "model.layers.0.mlp.up_proj.weight"
NORM = "model.layers.2.post_attention_layernorm.weight"
EMBED = "model.embed_tokens.weight"

SMOOTHED = LossSpec(head=(CrossEntropy(label_smoothing=0.1),))


def make(backend_name: str, spec: TrainSpec, seed: int = 0, **setup):
    backend = get_backend(backend_name)
    config, weights, inputs, targets, loss_weights = tiny_setup(seed, **setup)
    model = backend.build(config, weights, dtype="float32")
    return backend, backend.trainer(model, spec), config, weights, (inputs, targets, loss_weights)


# Adafactor with momentum: eps2 = 0.05 lies between the matrices' rms (~0.02) and the norms' (~0.3), so both
# sides of max(eps2, rms(p)) are used, and the learning rate changes between the steps.
OPTIMIZERS = {
    "adamw": OptimizerSpec(name="adamw", weight_decay=0.1),
    "adafactor": OptimizerSpec(name="adafactor", weight_decay=0.1),
    "adafactor-momentum": OptimizerSpec(name="adafactor", weight_decay=0.1, beta1=0.9, eps_adafactor=(1e-30, 0.05)),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_two_optimizer_steps_equal_the_numpy_formula(backend, optimizer, max_norm):
    opt = OPTIMIZERS[optimizer]
    spec = TrainSpec(optimizer=opt, max_grad_norm=max_norm, loss_chunk_tokens=16)
    b, trainer, config, weights, batch = make(backend, spec)
    expected = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    states: dict[str, dict] = {k: {} for k in weights}
    for t, lr in ((1, 3e-3), (2, 1e-2)):
        trainer.accumulate(*batch)
        grads = trainer.gradients()
        assert set(grads) == set(weights)
        tokens = float(batch[2].sum())
        clipped, norm = clip_by_global_norm({k: g.astype(np.float64) / tokens for k, g in grads.items()}, max_norm)
        result = trainer.apply(lr, tokens)
        assert result["grad_norm"] == pytest.approx(norm, rel=1e-5)
        for name in weights:
            if opt.name == "adamw":
                expected[name] = adamw_step(expected[name], clipped[name], states[name], lr=lr, t=t, weight_decay=0.1)
            else:
                expected[name] = adafactor_step(expected[name], clipped[name], states[name], lr=lr, t=t,
                                                weight_decay=0.1, beta1=opt.beta1, eps=opt.eps_adafactor)
        got = b.weights(trainer.model)
        for name in (UP, NORM, EMBED):
            step = np.abs(expected[name] - weights[name]).max()
            np.testing.assert_allclose(got[name], expected[name], atol=1e-4 * step + 1e-7, err_msg=f"{name} t={t}")
        # feed the next step from the backend's own weights, so the check stays per-step
        expected = {k: np.asarray(v, np.float64) for k, v in got.items()}
        weights = {k: np.array(v) for k, v in got.items()}  # copies: a backend may hand out live views


def test_frozen_parameters_stay_and_scales_scale_the_step(backend):
    spec = TrainSpec(optimizer=OptimizerSpec(name="adamw", weight_decay=0.1), max_grad_norm=None)
    b, trainer, config, weights, batch = make(backend, spec)
    scales = {UP: 0.0, NORM: 0.5}
    trainer.set_lr_scales(scales)
    trainer.accumulate(*batch)
    grads = trainer.gradients()
    assert UP not in grads
    tokens = float(batch[2].sum())
    trainer.apply(1e-2, tokens)
    got = b.weights(trainer.model)
    assert np.array_equal(got[UP], weights[UP])
    expected_norm = adamw_step(weights[NORM], grads[NORM] / tokens, {}, lr=0.5e-2, t=1, weight_decay=0.1)
    np.testing.assert_allclose(got[NORM], expected_norm, atol=1e-6)
    assert not np.array_equal(got[EMBED], weights[EMBED])


def test_gradients_match_finite_differences_of_the_reference(backend):
    spec = TrainSpec(max_grad_norm=None, loss_chunk_tokens=12)
    b, trainer, config, weights, (inputs, targets, loss_weights) = make(backend, spec, batch=1, seq=12)
    trainer.accumulate(inputs, targets, loss_weights)
    grads = trainer.gradients()
    w64 = {k: v.astype(np.float64) for k, v in weights.items()}
    rng = np.random.default_rng(1)
    h = 1e-5
    for name in (EMBED, NORM, UP, "model.layers.5.self_attn.k_proj.weight"):
        if name == EMBED:
            index = (int(inputs[0, 4]), int(rng.integers(config.hidden_size)))  # a row the batch uses
        else:
            index = tuple(int(rng.integers(n)) for n in w64[name].shape)
        plus, minus = dict(w64), dict(w64)
        plus[name], minus[name] = w64[name].copy(), w64[name].copy()
        plus[name][index] += h
        minus[name][index] -= h
        numeric = (reference_loss_sum(config, plus, inputs, targets, loss_weights)
                   - reference_loss_sum(config, minus, inputs, targets, loss_weights)) / (2 * h)
        assert grads[name][index] == pytest.approx(numeric, rel=2e-3, abs=1e-5), name


def test_chunked_loss_equals_the_naive_loss(backend):
    b, trainer, config, weights, (inputs, targets, loss_weights) = make(backend, TrainSpec())
    expected = reference_loss_sum(config, weights, inputs, targets, loss_weights, label_smoothing=0.1)
    for chunk in (5, 16, 1000):
        got = b.loss_sum(trainer.model, inputs, targets, loss_weights, chunk_tokens=chunk, label_smoothing=0.1)
        assert got == pytest.approx(expected, rel=1e-5), chunk


def test_chunked_loss_gradient_is_independent_of_the_chunk(backend):
    # The gradient of the chunked loss, with chunks of 5 and one chunk of everything (the naive loss),
    # both checked against each other and, through the finite-difference test above, against the reference.
    grads = []
    for chunk in (5, 4096):
        _, trainer, *_, batch = make(backend, TrainSpec(loss_chunk_tokens=chunk, loss=SMOOTHED))
        trainer.accumulate(*batch)
        grads.append(trainer.gradients())
    for name in grads[0]:  # to 1e-5 of the gradient's scale: summation order differs between chunkings
        scale = np.abs(grads[1][name]).max()
        np.testing.assert_allclose(grads[0][name], grads[1][name], rtol=0, atol=1e-5 * scale, err_msg=name)


def test_accumulated_micro_batches_equal_one_large_batch(backend):
    spec = TrainSpec(loss_chunk_tokens=16)
    b, big, config, weights, (inputs, targets, loss_weights) = make(backend, spec, batch=6)
    _, small, *_ = make(backend, spec, batch=6)
    big_loss = big.accumulate(inputs, targets, loss_weights)
    small_loss = sum(small.accumulate(inputs[rows], targets[rows], loss_weights[rows])
                     for rows in (slice(0, 2), slice(2, 4), slice(4, 6)))
    assert small_loss == pytest.approx(big_loss, rel=1e-6)
    g_big, g_small = big.gradients(), small.gradients()
    for name in g_big:
        scale = np.abs(g_big[name]).max()
        np.testing.assert_allclose(g_small[name], g_big[name], rtol=0, atol=1e-5 * scale, err_msg=name)
    tokens = float(loss_weights.sum())
    assert small.apply(1e-3, tokens)["grad_norm"] == pytest.approx(big.apply(1e-3, tokens)["grad_norm"], rel=1e-6)
    got_big, got_small = b.weights(big.model), b.weights(small.model)
    for name in got_big:  # AdamW's first step is ~lr * sign(g): only near-zero gradients may differ
        assert np.mean(np.abs(got_small[name] - got_big[name]) > 1e-6) < 1e-3, name


def test_gradient_checkpointing_changes_nothing_and_bf16_is_close(backend):
    results = {}
    for key, spec in {"plain": TrainSpec(), "remat": TrainSpec(grad_checkpointing=True),
                      "bf16": TrainSpec(precision="bf16")}.items():
        _, trainer, *_, batch = make(backend, spec)
        loss = trainer.accumulate(*batch)
        results[key] = (loss, trainer.gradients())
    (loss, grads), (loss_remat, grads_remat) = results["plain"], results["remat"]
    assert loss_remat == pytest.approx(loss, rel=1e-6)
    for name in grads:  # to 1e-5 of the gradient's scale: a compiler may fuse the recomputed block differently
        scale = np.abs(grads[name]).max()
        np.testing.assert_allclose(grads_remat[name], grads[name], rtol=0, atol=1e-5 * scale, err_msg=name)
    loss_bf16, grads_bf16 = results["bf16"]
    assert loss_bf16 == pytest.approx(loss, rel=2e-2)
    assert all(g.dtype == np.float32 for g in grads_bf16.values())


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_optimizer_state_round_trip_continues_exactly(backend, optimizer):
    spec = TrainSpec(optimizer=OptimizerSpec(name=optimizer))
    b, first, config, weights, batch = make(backend, spec)
    for _ in range(2):
        first.accumulate(*batch)
        first.apply(1e-3, float(batch[2].sum()))
    second = b.trainer(b.build(config, b.weights(first.model), dtype="float32"), spec)
    second.load_optimizer_state(first.optimizer_state())
    for trainer in (first, second):
        trainer.accumulate(*batch)
        trainer.apply(1e-3, float(batch[2].sum()))
    a, c = b.weights(first.model), b.weights(second.model)
    for name in a:
        assert np.array_equal(a[name], c[name]), name


def test_non_finite_gradients_update_nothing(backend):
    b, trainer, config, weights, (inputs, targets, loss_weights) = make(backend, TrainSpec())
    trainer.accumulate(inputs, targets, loss_weights, loss_scale=float("inf"))
    result = trainer.apply(1e-3, 1.0)
    assert not np.isfinite(result["grad_norm"])
    got = b.weights(trainer.model)
    assert all(np.array_equal(got[k], weights[k]) for k in weights)


def test_untied_head_and_softcap_train(backend):
    spec = TrainSpec(loss_chunk_tokens=7)
    b, trainer, config, weights, batch = make(backend, spec, tie_word_embeddings=False, final_logit_softcapping=3.0)
    expected = reference_loss_sum(config, weights, *batch)
    assert trainer.accumulate(*batch) == pytest.approx(expected, rel=1e-5)
    assert "lm_head.weight" in trainer.gradients()
