"""Each backend's training tensor work against independent oracles (tests/train_oracles.py): optimizer
steps against the numpy formulas, gradients against finite differences of the float64 reference, the
chunked loss against the naive one, accumulation against one large batch, state round trips, and the
canonical optimizer state: its names and values against the formulas, and one backend's state continued
on every other one."""

from __future__ import annotations

import functools
import itertools
import re

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from train_oracles import adafactor_step, adamw_step, clip_by_global_norm, reference_loss_sum, tiny_setup

import gemmalab
from gemmalab.backend import get_backend
from gemmalab.errors import CheckpointError
from gemmalab.train.losses import CrossEntropy, LossSpec
from gemmalab.train.spec import OptimizerSpec, TrainSpec, expected_state_names

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


# --- the canonical optimizer state (gemmalab/train/spec.py) ------------------------------------------------------
def state_spec(optimizer: str) -> TrainSpec:
    """The spec of the state tests: that of the formula test above without clipping (one compilation on JAX)."""
    return TrainSpec(optimizer=OPTIMIZERS[optimizer], max_grad_norm=None, loss_chunk_tokens=16)


# spec.py's state names -> the names train_oracles keeps the same quantities under
ORACLE_STATE = {"adamw": {"exp_avg": "m", "exp_avg_sq": "v"},
                "adafactor": {"exp_avg_sq_row": "r", "exp_avg_sq_col": "c", "exp_avg_sq": "v", "exp_avg": "m"}}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_optimizer_state_has_the_canonical_names_and_the_formulas_values(backend, optimizer):
    # The state after two steps depends only on the gradients: the oracle runs the formulas on the backend's
    # own gradients (checked against finite differences above).
    opt = OPTIMIZERS[optimizer]
    b, trainer, config, weights, batch = make(backend, state_spec(optimizer))
    tokens = float(batch[2].sum())
    states: dict[str, dict] = {name: {} for name in weights}
    for t, lr in ((1, 3e-3), (2, 1e-2)):
        trainer.accumulate(*batch)
        grads = {name: g.astype(np.float64) / tokens for name, g in trainer.gradients().items()}
        trainer.apply(lr, tokens)
        for name, g in grads.items():
            if opt.name == "adamw":
                adamw_step(weights[name], g, states[name], lr=lr, t=t, weight_decay=0.1)
            else:
                adafactor_step(weights[name], g, states[name], lr=lr, t=t, weight_decay=0.1, beta1=opt.beta1,
                               eps=opt.eps_adafactor)
    got = trainer.optimizer_state()
    assert set(got) == {f"{kind}/{name}" for name in states for kind in expected_state_names(opt, weights[name].shape)}
    for key, value in got.items():
        kind, _, name = key.partition("/")
        if kind == "step":
            assert value.dtype == np.int64 and value.tolist() == [2], key
            continue
        want = states[name][ORACLE_STATE[opt.name][kind]]
        assert value.dtype == np.float32 and value.shape == want.shape, key
        np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=key)


def test_a_parameter_never_updated_has_no_optimizer_state(backend):
    # the spec of the frozen-parameter test above (one compilation on JAX)
    b, trainer, config, weights, batch = make(backend, TrainSpec(optimizer=OPTIMIZERS["adamw"], max_grad_norm=None))
    trainer.accumulate(*batch, loss_scale=float("inf"))  # a first step that is skipped
    trainer.apply(1e-3, 1.0)
    assert trainer.optimizer_state() == {}
    trainer.set_lr_scales({UP: 0.0})
    trainer.accumulate(*batch)
    trainer.apply(1e-3, float(batch[2].sum()))
    names = {key.partition("/")[2] for key in trainer.optimizer_state()}
    assert names == set(weights) - {UP}


def test_an_optimizer_state_that_does_not_fit_is_refused_in_one_line(backend):
    b, trainer, config, weights, batch = make(backend, TrainSpec())
    trainer.accumulate(*batch)
    trainer.apply(1e-3, float(batch[2].sum()))
    state = trainer.optimizer_state()
    zeros = np.zeros(3, np.float32)
    cases = [  # (the state, what the one line says)
        ({**state, f"exp_avg/{NORM}": zeros}, f"{NORM} holds exp_avg float32 [3], exp_avg_sq float32 [64]"),
        ({k: v for k, v in state.items() if k != f"exp_avg_sq/{UP}"},
         f"{UP} holds exp_avg float32 [128, 64], step int64 [1], where adamw needs exp_avg float32 [128, 64], "
         "exp_avg_sq float32 [128, 64], step int64 [1] for its shape [128, 64]"),
        ({**state, f"exp_avg_sq_row/{UP}": np.zeros(128, np.float32)}, f"{UP} holds exp_avg float32"),
        ({**state, f"exp_avg/{NORM}": state[f"exp_avg/{NORM}"].astype(np.float64)}, "exp_avg float64 [64]"),
        ({**state, f"step/{NORM}": np.array([0], np.int64)}, f"{NORM} has step [0], not a whole number"),
        ({**state, "exp_avg/model.nope.weight": zeros}, "'exp_avg/model.nope.weight', for a parameter this model"),
    ]
    for bad, message in cases:
        with pytest.raises(CheckpointError, match=re.escape(message)) as refused:
            trainer.load_optimizer_state(bad)
        assert "\n" not in str(refused.value)
    after = trainer.optimizer_state()  # a refused state changes nothing
    assert after.keys() == state.keys() and all(np.array_equal(after[k], state[k]) for k in state)


PAIRS = list(itertools.permutations(gemmalab.backends(), 2))
LRS = (3e-3, 1e-2, 5e-3, 2e-3)  # the learning rates of four steps: two before the hand-over, two after


def _steps(trainer, batch, lrs) -> list[float]:
    """One step per learning rate; the mean losses."""
    losses = []
    for lr in lrs:
        losses.append(trainer.accumulate(*batch) / float(batch[2].sum()))
        trainer.apply(lr, float(batch[2].sum()))
    return losses


@functools.cache
def _own_run(backend_name: str, optimizer: str):
    """Four steps on one backend: (weights and state after two, the state through safetensors as checkpoints
    store it; the losses of steps 3 and 4; the weights after them)."""
    b, trainer, config, weights, batch = make(backend_name, state_spec(optimizer))
    _steps(trainer, batch, LRS[:2])
    halfway = {k: np.array(v) for k, v in b.weights(trainer.model).items()}  # copies: weights may be live views
    state = st_load(st_save(trainer.optimizer_state()))
    losses = _steps(trainer, batch, LRS[2:])
    return halfway, state, losses, {k: np.array(v) for k, v in b.weights(trainer.model).items()}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize(("writer", "reader"), PAIRS or [pytest.param(None, None, marks=pytest.mark.skip("needs two backends"))])
def test_a_state_written_on_one_backend_continues_on_another(writer, reader, optimizer):
    # Oracles: the writer continuing its own state from the same weights (the same two steps, so only float
    # rounding may differ), and the reader's own uninterrupted run.
    halfway, state, writer_losses, writer_after = _own_run(writer, optimizer)
    reader_losses = _own_run(reader, optimizer)[2]
    b = get_backend(reader)
    config = tiny_setup(0)[0]
    trainer = b.trainer(b.build(config, halfway, dtype="float32"), state_spec(optimizer))
    trainer.load_optimizer_state(state)
    losses = _steps(trainer, tiny_setup(0)[2:], LRS[2:])
    assert losses == pytest.approx(writer_losses, rel=1e-6)
    assert losses == pytest.approx(reader_losses, rel=1e-5)
    after = b.weights(trainer.model)
    for name, want in writer_after.items():  # to 1e-3 of the two steps: a wrong step count, sign or layout is ~1
        moved = np.abs(want - halfway[name]).max()
        np.testing.assert_allclose(after[name], want, rtol=0, atol=1e-3 * moved + 1e-7, err_msg=name)
