"""The JAX backend's training tensor work (backends/gemmalab_jax/training.py) against independent oracles:
optimizer steps against the numpy formulas of gemmalab/train/spec.py (tests/train_oracles.py), gradients
against finite differences of the float64 numpy reference, the chunked loss against the naive full-logits
loss (numpy float64 for its value, a plain JAX full-logits loss for its gradient), accumulation against
one large batch, and the optimizer state round trip. Tiny configs: 6 layers, sequences past the window.

Specs are shared between tests where they can be: the jitted steps are compiled once per spec and shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from gemmalab_jax import model as jax_model  # noqa: E402
from gemmalab_jax.training import chunked_loss_sum, head_loss_sum  # noqa: E402
from jax.ad_checkpoint import print_saved_residuals  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from train_oracles import (  # noqa: E402
    adafactor_step,
    adamw_step,
    clip_by_global_norm,
    naive_loss_sum,
    reference_loss_sum,
    tiny_setup,
)

from gemmalab import reference  # noqa: E402
from gemmalab.backend import get_backend  # noqa: E402
from gemmalab.checkpoint import atomic_save_safetensors  # noqa: E402
from gemmalab.errors import CheckpointError, InputError  # noqa: E402
from gemmalab.train.losses import CrossEntropy, LossSpec  # noqa: E402
from gemmalab.train.spec import OptimizerSpec, TrainSpec  # noqa: E402

BACKEND = get_backend("jax")
EMBED = "model.embed_tokens.weight"
UP = "model.layers.0.mlp.up_proj.weight"
NORM = "model.layers.2.post_attention_layernorm.weight"
Q_PROJ = "model.layers.5.self_attn.q_proj.weight"  # the global layer
LR = 3e-3
# One spec per optimizer, shared by most tests. Adafactor clips (0.05 is far below the tiny model's gradient
# norm), AdamW does not (so a halved learning rate halves its step exactly); both decay weights.
SPECS = {
    "adamw": TrainSpec(
        optimizer=OptimizerSpec(name="adamw", weight_decay=0.1), max_grad_norm=None, loss_chunk_tokens=16
    ),
    "adafactor": TrainSpec(
        optimizer=OptimizerSpec(name="adafactor", weight_decay=0.1), max_grad_norm=0.05, loss_chunk_tokens=16
    ),
}
SMOOTHED = LossSpec(head=(CrossEntropy(label_smoothing=0.1),))
# Chunks of 7 over the 40 positions of a tiny_setup batch: 6 chunks, the last one padded.
CHUNKED = TrainSpec(max_grad_norm=None, loss_chunk_tokens=7, loss=SMOOTHED)
UNTIED_SOFTCAP = {"tie_word_embeddings": False, "final_logit_softcapping": 3.0}


def make(spec: TrainSpec, seed: int = 0, **setup):
    """(trainer, config, float32 numpy weights, (inputs, targets, loss weights)) on tiny_setup."""
    config, weights, inputs, targets, loss_weights = tiny_setup(seed, **setup)
    trainer = BACKEND.trainer(BACKEND.build(config, weights, dtype="float32"), spec)
    return trainer, config, weights, (inputs, targets, loss_weights)


def step(trainer, batch, lr: float = LR) -> dict[str, float]:
    trainer.accumulate(*batch)
    return trainer.apply(lr, float(batch[2].sum()))


def scaled_close(actual: np.ndarray, expected: np.ndarray, rel: float, name: str) -> None:
    """Elementwise within ``rel`` of the array's scale (float32 sums of different order differ by ~1e-7 of
    it, so entries near zero cannot be compared relative to themselves)."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * scale, err_msg=name)


# --- the optimizer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_two_steps_follow_the_spec_formulas(optimizer):
    spec = SPECS[optimizer]
    trainer, config, weights, batch = make(spec)
    tokens = float(batch[2].sum())
    states: dict[str, dict] = {name: {} for name in weights}
    current = {name: value.astype(np.float64) for name, value in weights.items()}
    for t in (1, 2):
        trainer.accumulate(*batch)
        grads = trainer.gradients()
        assert set(grads) == set(weights) and all(g.dtype == np.float32 for g in grads.values())
        clipped, norm = clip_by_global_norm(
            {name: g.astype(np.float64) / tokens for name, g in grads.items()}, spec.max_grad_norm
        )
        if spec.max_grad_norm is not None:
            assert norm > 10 * spec.max_grad_norm  # clipping is active
        assert trainer.apply(LR, tokens)["grad_norm"] == pytest.approx(norm, rel=1e-5)
        got = BACKEND.weights(trainer.model)
        for name, p in current.items():
            if optimizer == "adamw":
                expected = adamw_step(p, clipped[name], states[name], lr=LR, t=t, weight_decay=0.1)
            else:
                expected = adafactor_step(p, clipped[name], states[name], lr=LR, t=t, weight_decay=0.1)
            # to 1e-4 of the step: the formula's own float32 rounding, far below any formula difference
            np.testing.assert_allclose(
                got[name],
                expected,
                rtol=0,
                atol=1e-4 * np.abs(expected - p).max() + 1e-7,
                err_msg=f"{name} t={t}",
            )
        # the next step starts from the backend's weights, so each step is checked on its own
        current = {name: value.astype(np.float64) for name, value in got.items()}
    counts = {key: value for key, value in trainer.optimizer_state().items() if key.startswith("step/")}
    assert len(counts) == len(weights) and all(c.tolist() == [2] for c in counts.values())


def test_frozen_parameter_stays_and_scales_are_per_parameter():
    spec = SPECS["adamw"]
    trainer, config, weights, batch = make(spec)
    full, *_ = make(spec)  # every scale 1: the step the halved one is compared with
    trainer.set_lr_scales({UP: 0.0, NORM: 0.5})
    tokens = float(batch[2].sum())
    trainer.accumulate(*batch)
    grads = trainer.gradients()
    assert UP not in grads
    trainer.apply(LR, tokens)
    step(full, batch)
    got, got_full = BACKEND.weights(trainer.model), BACKEND.weights(full.model)
    assert np.array_equal(got[UP], weights[UP])
    assert not any(key.endswith("/" + UP) for key in trainer.optimizer_state())
    np.testing.assert_allclose(
        got[NORM] - weights[NORM], 0.5 * (got_full[NORM] - weights[NORM]), rtol=1e-4, atol=1e-9
    )
    expected = adamw_step(weights[NORM], grads[NORM] / tokens, {}, lr=0.5 * LR, t=1, weight_decay=0.1)
    np.testing.assert_allclose(got[NORM], expected, rtol=0, atol=1e-7)

    # Unfrozen, UP takes its own first step (t = 1) while NORM takes its second: spec.py counts per parameter.
    trainer.set_lr_scales({})
    trainer.accumulate(*batch)
    grads_2 = trainer.gradients()
    trainer.apply(LR, tokens)
    after = BACKEND.weights(trainer.model)
    expected_up = adamw_step(got[UP], grads_2[UP] / tokens, {}, lr=LR, t=1, weight_decay=0.1)
    np.testing.assert_allclose(
        after[UP], expected_up, rtol=0, atol=1e-4 * np.abs(expected_up - got[UP]).max()
    )
    counts = trainer.optimizer_state()
    assert counts[f"step/{UP}"].tolist() == [1] and counts[f"step/{NORM}"].tolist() == [2]


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_optimizer_state_round_trip_continues_bit_for_bit(optimizer, tmp_path):
    spec = SPECS[optimizer]
    first, config, _, batch = make(spec)
    for _ in range(2):
        step(first, batch)
    # through the file the core's checkpoints write (safetensors: 0-d step counts come back as [1])
    atomic_save_safetensors(tmp_path / "state.safetensors", first.optimizer_state())
    saved = load_file(str(tmp_path / "state.safetensors"))
    second = BACKEND.trainer(BACKEND.build(config, BACKEND.weights(first.model), dtype="float32"), spec)
    second.load_optimizer_state(saved)
    for trainer in (first, second):
        step(trainer, batch)
    a, b = BACKEND.weights(first.model), BACKEND.weights(second.model)
    assert all(np.array_equal(a[name], b[name]) for name in a)
    state_a, state_b = first.optimizer_state(), second.optimizer_state()
    assert state_a.keys() == state_b.keys() and all(np.array_equal(state_a[k], state_b[k]) for k in state_a)
    other = "adafactor" if optimizer == "adamw" else "adamw"
    with pytest.raises(CheckpointError):
        BACKEND.trainer(first.model, SPECS[other]).load_optimizer_state(saved)


def test_non_finite_gradients_update_nothing_and_empty_the_accumulator():
    trainer, config, weights, batch = make(SPECS["adamw"])
    step(trainer, batch)
    before_weights, before_state = BACKEND.weights(trainer.model), trainer.optimizer_state()
    trainer.accumulate(*batch, loss_scale=float("inf"))
    assert not np.isfinite(trainer.apply(LR, 1.0)["grad_norm"])
    after_weights, after_state = BACKEND.weights(trainer.model), trainer.optimizer_state()
    assert all(np.array_equal(after_weights[k], before_weights[k]) for k in before_weights)
    assert all(np.array_equal(after_state[k], before_state[k]) for k in before_state)
    assert all(not g.any() for g in trainer.gradients().values())


# --- gradients and the loss -----------------------------------------------------------------------------------
def test_gradients_match_finite_differences_of_the_float64_reference():
    trainer, config, weights, (inputs, targets, loss_weights) = make(CHUNKED)
    trainer.accumulate(inputs, targets, loss_weights)
    grads = trainer.gradients()
    w64 = {name: value.astype(np.float64) for name, value in weights.items()}
    rng = np.random.default_rng(1)
    h = 1e-5
    for name in (EMBED, NORM, UP, Q_PROJ):
        g = grads[name]
        picks = [np.unravel_index(np.abs(g).argmax(), g.shape)]
        if name == EMBED:
            # a row of a token in the batch (input embedding and head), and a row only the head uses
            unused = next(token for token in range(config.vocab_size) if token not in inputs)
            picks += [(int(inputs[0, 4]), int(rng.integers(config.hidden_size))), (unused, 7)]
        else:
            picks += [tuple(int(rng.integers(n)) for n in g.shape) for _ in range(2)]
        for index in picks:
            plus, minus = dict(w64), dict(w64)
            plus[name], minus[name] = w64[name].copy(), w64[name].copy()
            plus[name][index] += h
            minus[name][index] -= h
            numeric = (
                reference_loss_sum(config, plus, inputs, targets, loss_weights, label_smoothing=0.1)
                - reference_loss_sum(config, minus, inputs, targets, loss_weights, label_smoothing=0.1)
            ) / (2 * h)
            tolerance = 1e-5 * float(np.abs(g).max())
            assert g[index] == pytest.approx(numeric, rel=1e-3, abs=tolerance), (name, index)


def naive_jax_loss(params, config, ids, targets, weights, label_smoothing):
    """The loss from full [batch, seq, vocab] logits, written plainly: the oracle for the chunked gradient."""
    positions = jnp.arange(ids.shape[1])[None]
    rope = {
        kind: jax_model.rope_tables(np.arange(ids.shape[1])[None], spec, config.head_dim)
        for kind, spec in (("sliding_attention", config.rope_local), ("full_attention", config.rope_global))
    }
    masks = jax_model.default_masks(config, positions)
    hidden = jax_model.text_model(params, config, ids, mask=masks, rope=rope).last_hidden_state
    return naive_head_loss(params, config, hidden, targets, weights, label_smoothing)


def naive_head_loss(params, config, hidden, targets, weights, label_smoothing):
    logits = jax_model.logits_from_hidden(params, config, hidden).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(((1 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=-1)) * weights)


def chunk_weights(loss_weights: np.ndarray) -> np.ndarray:
    """tiny_setup's loss weights with more zeros and a fractional weight."""
    loss_weights = loss_weights.copy()
    loss_weights[1, 10:14] = 0.0
    loss_weights[1, 15] = 0.5
    return loss_weights


def test_chunked_loss_equals_the_naive_loss_in_value_and_gradient():
    trainer, config, weights, (inputs, targets, loss_weights) = make(CHUNKED)
    loss_weights = chunk_weights(loss_weights)
    expected = naive_loss_sum(reference.forward(config, weights, inputs), targets, loss_weights, 0.1)
    got = BACKEND.loss_sum(trainer.model, inputs, targets, loss_weights, chunk_tokens=7, label_smoothing=0.1)
    assert got == pytest.approx(expected, rel=1e-5)
    assert trainer.accumulate(inputs, targets, loss_weights) == pytest.approx(expected, rel=1e-5)

    with jax.default_matmul_precision("highest"):
        oracle = jax.jit(jax.grad(naive_jax_loss), static_argnums=(1, 5))(
            trainer.model.params, config, inputs, targets, loss_weights, 0.1
        )
    oracle = jax_model.flatten(oracle)
    grads = trainer.gradients()
    assert set(grads) == set(oracle) == set(weights)
    for name, g in grads.items():
        scaled_close(g, np.asarray(oracle[name]), 1e-5, name)


def test_chunked_loss_with_an_untied_soft_capped_head():
    # The value through the whole model; the gradient at the head, where chunking acts (the backbone under
    # it is the one checked above), against the naive loss of the same hidden states.
    config, weights, inputs, targets, loss_weights = tiny_setup(0, **UNTIED_SOFTCAP)
    loss_weights = chunk_weights(loss_weights)
    model = BACKEND.build(config, weights, dtype="float32")
    expected = naive_loss_sum(reference.forward(config, weights, inputs), targets, loss_weights, 0.1)
    got = BACKEND.loss_sum(model, inputs, targets, loss_weights, chunk_tokens=7, label_smoothing=0.1)
    assert got == pytest.approx(expected, rel=1e-5)

    hidden = jnp.asarray(np.random.default_rng(2).normal(size=(inputs.size, config.hidden_size)), jnp.float32)
    flat_targets, flat_weights = targets.reshape(-1), loss_weights.reshape(-1)

    def chunked(params, hidden):
        return head_loss_sum(
            params, config, hidden, flat_targets, flat_weights, chunk_tokens=7, terms=SMOOTHED.head
        )

    def naive(params, hidden):
        return naive_head_loss(params, config, hidden, flat_targets, flat_weights, 0.1)

    with jax.default_matmul_precision("highest"):
        got_params, got_hidden = jax.jit(jax.grad(chunked, argnums=(0, 1)))(model.params, hidden)
        oracle_params, oracle_hidden = jax.jit(jax.grad(naive, argnums=(0, 1)))(model.params, hidden)
    scaled_close(np.asarray(got_hidden), np.asarray(oracle_hidden), 1e-5, "hidden")
    head = "lm_head.weight"
    got_head, oracle_head = jax_model.flatten(got_params)[head], jax_model.flatten(oracle_params)[head]
    assert np.abs(oracle_head).max() > 0
    scaled_close(np.asarray(got_head), np.asarray(oracle_head), 1e-5, head)


def saved_residuals(f, *args) -> list[str]:
    """What the forward pass of f keeps for its backward pass, one line per array (jax's own listing),
    less f's arguments (the parameters, alive anyway)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    return [line for line in out.getvalue().splitlines() if "from the argument" not in line]


def test_full_logits_never_exist():
    # Backward: the chunk's logits are recomputed, not stored, so no residual has a vocab dimension.
    config, weights, inputs, targets, loss_weights = tiny_setup(0, vocab_size=1031)
    model = BACKEND.build(config, weights, dtype="float32")
    rope = model.rope(np.arange(inputs.shape[1])[None])

    def loss(params):
        return chunked_loss_sum(
            params, config, inputs, targets, loss_weights, rope, chunk_tokens=8, loss=SMOOTHED
        )

    residuals = saved_residuals(loss, model.params)
    assert residuals and not [line for line in residuals if re.search(rf"\b{config.vocab_size}\]", line)]

    # Forward and backward together, compiled: the peak of temporary buffers stays below one copy of the
    # [positions, vocab] float32 logits (XLA's own accounting).
    n, dim, vocab = 512, 64, 32768
    big = dataclasses.replace(config, vocab_size=vocab)

    def head_loss(hidden, matrix, targets, weights):
        params = {"model": {"embed_tokens": {"weight": matrix}}}
        return head_loss_sum(params, big, hidden, targets, weights, chunk_tokens=32, terms=SMOOTHED.head)

    args = (jnp.zeros((n, dim)), jnp.zeros((vocab, dim)), jnp.zeros(n, jnp.int32), jnp.ones(n))
    compiled = jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1))).lower(*args).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < n * vocab * 4 / 2


def test_accumulated_micro_batches_equal_one_large_batch():
    spec = SPECS["adafactor"]
    big, config, weights, (inputs, targets, loss_weights) = make(spec, batch=6)
    small, *_ = make(spec, batch=6)
    big_loss = big.accumulate(inputs, targets, loss_weights)
    small_loss = sum(
        small.accumulate(inputs[rows], targets[rows], loss_weights[rows])
        for rows in (slice(0, 2), slice(2, 4), slice(4, 6))
    )
    assert small_loss == pytest.approx(big_loss, rel=1e-6)
    g_big, g_small = big.gradients(), small.gradients()
    for name in g_big:
        scaled_close(g_small[name], g_big[name], 1e-5, name)
    tokens = float(loss_weights.sum())
    norm_small, norm_big = small.apply(1e-2, tokens)["grad_norm"], big.apply(1e-2, tokens)["grad_norm"]
    assert norm_small == pytest.approx(norm_big, rel=1e-6)
    w_big, w_small = BACKEND.weights(big.model), BACKEND.weights(small.model)
    for name in w_big:
        assert np.abs(w_big[name] - weights[name]).max() > 1e-5  # the step moved it
        np.testing.assert_allclose(w_small[name], w_big[name], rtol=0, atol=1e-6, err_msg=name)


def test_gradient_checkpointing_and_reduced_precision():
    base = TrainSpec(max_grad_norm=None, loss_chunk_tokens=16)
    results = {}
    for key, spec in {
        "fp32": base,
        "remat": dataclasses.replace(base, grad_checkpointing=True),
        "bf16": dataclasses.replace(base, precision="bf16"),
        "fp16": dataclasses.replace(base, precision="fp16"),
    }.items():
        trainer, config, weights, batch = make(spec)
        # fp16 trains with a scaled loss; at 1024 this model's layer-0 gradients overflow float16 (as the
        # core's dynamic loss scaling expects them to, at times)
        scale = 8.0 if key == "fp16" else 1.0
        loss = trainer.accumulate(*batch, loss_scale=scale)
        results[key] = loss, {name: g / scale for name, g in trainer.gradients().items()}

    loss, grads = results["fp32"]
    loss_remat, grads_remat = results["remat"]
    assert loss_remat == pytest.approx(loss, rel=1e-6)
    for name in grads:  # the same function: only XLA's float32 summation order differs
        scaled_close(grads_remat[name], grads[name], 1e-5, name)
    for key in ("bf16", "fp16"):
        low_loss, low_grads = results[key]
        assert low_loss == pytest.approx(loss, rel=2e-2), key
        assert all(g.dtype == np.float32 and np.isfinite(g).all() for g in low_grads.values()), key
        flat = np.concatenate([g.ravel() for g in grads.values()])
        low = np.concatenate([low_grads[name].ravel() for name in grads])
        assert flat @ low / (np.linalg.norm(flat) * np.linalg.norm(low)) > 0.99, key  # same direction

    # Per-block remat stores each block's input only: no attention or MLP intermediates are kept.
    config, weights, inputs, targets, loss_weights = tiny_setup(0)
    model = BACKEND.build(config, weights, dtype="float32")
    rope = model.rope(np.arange(inputs.shape[1])[None])
    for remat in (False, True):
        residuals = saved_residuals(
            lambda params, remat=remat: chunked_loss_sum(
                params,
                config,
                inputs,
                targets,
                loss_weights,
                rope,
                chunk_tokens=16,
                remat=remat,
            ),
            model.params,
        )
        inside = [line for line in residuals if re.search(r"\((attention|mlp)\)", line)]
        assert bool(inside) != remat, remat


# --- bad input -------------------------------------------------------------------------------------------------
def test_bad_input_raises_one_clear_error():
    trainer, config, weights, (inputs, targets, loss_weights) = make(SPECS["adamw"])
    with pytest.raises(InputError):
        trainer.accumulate(inputs, targets[:, :-1], loss_weights)
    with pytest.raises(InputError):
        trainer.accumulate(inputs.astype(np.float32), targets, loss_weights)
    with pytest.raises(InputError):
        trainer.accumulate(inputs, np.full_like(targets, config.vocab_size), loss_weights)
    with pytest.raises(InputError):
        BACKEND.loss_sum(trainer.model, inputs, targets, loss_weights, chunk_tokens=0)
    with pytest.raises(InputError):
        trainer.set_lr_scales({"model.no_such.weight": 1.0})
    with pytest.raises(InputError):
        BACKEND.trainer(BACKEND.build(config, weights, dtype="bfloat16"), SPECS["adamw"])
