"""The MLX trainer (backends/gemmalab_mlx/training.py) against independent oracles: the numpy optimizer
formulas of gemmalab/train/spec.py (tests/train_oracles.py, plus Adafactor's first moment written here),
central finite differences of the float64 numpy reference, the naive full-logits loss (numpy float64 for
its value, MLX autodiff of the unchunked logits for its gradient), and a trainer against itself only
where the claim is an identity (accumulation, checkpointing, state round trips).

Every model is the tiny preset (6 layers: 5 local + 1 global, window 8) on sequences longer than the
window, with random norm weights and some zero loss weights (train_oracles.tiny_setup)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from train_oracles import (
    adafactor_step,
    adamw_step,
    clip_by_global_norm,
    naive_loss_sum,
    reference_loss_sum,
    tiny_setup,
)

from gemmalab import reference
from gemmalab.errors import CheckpointError
from gemmalab.train.losses import CrossEntropy, LossSpec
from gemmalab.train.spec import OptimizerSpec, TrainSpec

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
from gemmalab_mlx import BACKEND  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402  (after the skip: mlx may be missing)
from safetensors.numpy import load as st_load  # noqa: E402
from safetensors.numpy import save as st_save  # noqa: E402

EMBED = "model.embed_tokens.weight"
UP = "model.layers.0.mlp.up_proj.weight"
NORM = "model.layers.2.post_attention_layernorm.weight"
Q_GLOBAL = "model.layers.5.self_attn.q_proj.weight"
FINAL_NORM = "model.norm.weight"
UNTIED = {"tie_word_embeddings": False, "final_logit_softcapping": 3.0}

SMOOTHED = LossSpec(head=(CrossEntropy(label_smoothing=0.1),))


def make(spec: TrainSpec, seed: int = 0, **setup):
    """(trainer, float32 weights, config, (inputs, targets, loss weights)) on a fresh float32 model."""
    config, weights, inputs, targets, loss_weights = tiny_setup(seed, **setup)
    model = BACKEND.build(config, weights, dtype="float32")
    return BACKEND.trainer(model, spec), weights, config, (inputs, targets, loss_weights)


@pytest.mark.parametrize(
    ("name", "beta1", "max_norm"),
    [("adamw", None, None), ("adamw", None, 0.05), ("adafactor", None, 0.05), ("adafactor", 0.9, None)],
)
def test_two_steps_equal_the_numpy_formulas(name, beta1, max_norm):
    opt = OptimizerSpec(name=name, weight_decay=0.1, beta1=beta1)
    trainer, weights, config, batch = make(
        TrainSpec(optimizer=opt, max_grad_norm=max_norm, loss_chunk_tokens=16)
    )
    lr, tokens = 3e-3, float(batch[2].sum())
    before = {k: v.astype(np.float64) for k, v in weights.items()}
    states: dict[str, dict] = {k: {} for k in weights}
    clipped_once = False
    for t in (1, 2):
        trainer.accumulate(*batch)
        grads = trainer.gradients()
        assert set(grads) == set(weights) and all(g.dtype == np.float32 for g in grads.values())
        clipped, norm = clip_by_global_norm(
            {k: g.astype(np.float64) / tokens for k, g in grads.items()}, max_norm
        )
        clipped_once |= max_norm is not None and norm > max_norm
        assert trainer.apply(lr, tokens)["grad_norm"] == pytest.approx(norm, rel=1e-5)
        got = BACKEND.weights(trainer.model)
        for key in weights:
            kw = {"lr": lr, "t": t}
            if name == "adamw":
                expected = adamw_step(before[key], clipped[key], states[key], weight_decay=0.1, **kw)
            else:
                expected = adafactor_step(before[key], clipped[key], states[key], weight_decay=0.1, beta1=beta1, **kw)
            step = np.abs(expected - before[key]).max()
            np.testing.assert_allclose(
                got[key], expected, rtol=0, atol=1e-4 * step + 1e-7, err_msg=f"{key} t={t}"
            )
        before = {k: v.astype(np.float64) for k, v in got.items()}  # keep the check per step
    assert clipped_once == (max_norm is not None)  # the clipping case really clips


def test_frozen_parameter_stays_and_half_scale_halves_the_adamw_step():
    spec = TrainSpec(optimizer=OptimizerSpec(name="adamw", weight_decay=0.1), max_grad_norm=None)
    scaled, weights, _, batch = make(spec)
    plain, *_ = make(spec)
    scaled.set_lr_scales({UP: 0.0, NORM: 0.5})
    lr, tokens = 1e-2, float(batch[2].sum())
    for trainer in (scaled, plain):
        trainer.accumulate(*batch)
    grads = scaled.gradients()
    assert UP not in grads and NORM in grads
    np.testing.assert_array_equal(
        grads[NORM], plain.gradients()[NORM]
    )  # freezing UP changes no other gradient
    for trainer in (scaled, plain):
        trainer.apply(lr, tokens)
    got, full = BACKEND.weights(scaled.model), BACKEND.weights(plain.model)
    assert np.array_equal(got[UP], weights[UP])
    assert not any(key.endswith("/" + UP) for key in scaled.optimizer_state())  # no state either
    np.testing.assert_allclose(
        got[NORM] - weights[NORM], 0.5 * (full[NORM] - weights[NORM]), rtol=1e-4, atol=1e-9
    )
    expected = adamw_step(weights[NORM], grads[NORM] / tokens, {}, lr=0.5 * lr, t=1, weight_decay=0.1)
    np.testing.assert_allclose(got[NORM], expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(got[EMBED], full[EMBED])  # scale 1 elsewhere: the same step


def test_non_finite_gradients_update_nothing_and_empty_the_accumulator():
    trainer, weights, _, batch = make(TrainSpec())
    trainer.accumulate(*batch, loss_scale=float("inf"))
    assert not np.isfinite(trainer.apply(1e-3, 1.0)["grad_norm"])
    assert trainer.gradients() == {} and trainer.optimizer_state() == {}
    got = BACKEND.weights(trainer.model)
    assert all(np.array_equal(got[k], weights[k]) for k in weights)


# --- gradients and the chunked loss ---------------------------------------------------------------------------
def test_gradients_match_finite_differences_of_the_float64_reference():
    spec = TrainSpec(max_grad_norm=None, loss_chunk_tokens=5, loss=SMOOTHED)
    trainer, weights, config, (inputs, targets, loss_weights) = make(spec, batch=1, seq=12)
    trainer.accumulate(inputs, targets, loss_weights)
    grads = trainer.gradients()
    w64 = {k: v.astype(np.float64) for k, v in weights.items()}
    rng = np.random.default_rng(1)
    h = 1e-5
    for name in (EMBED, NORM, FINAL_NORM, Q_GLOBAL, UP):
        g = grads[name]
        largest = np.unravel_index(int(np.argmax(np.abs(g))), g.shape)
        if name == EMBED:  # a row the batch reads (and the tied head writes), at its largest entry
            row = int(inputs[0, 4])
            entries = [(row, int(np.argmax(np.abs(g[row])))), largest]
        else:
            entries = [largest, tuple(int(rng.integers(n)) for n in g.shape)]
        for index in entries:
            plus, minus = dict(w64), dict(w64)
            plus[name], minus[name] = w64[name].copy(), w64[name].copy()
            plus[name][index] += h
            minus[name][index] -= h
            numeric = (
                reference_loss_sum(config, plus, inputs, targets, loss_weights, 0.1)
                - reference_loss_sum(config, minus, inputs, targets, loss_weights, 0.1)
            ) / (2 * h)
            assert g[index] == pytest.approx(numeric, rel=1e-3, abs=1e-3 * float(np.abs(g).max())), (
                name,
                index,
            )


def naive_mlx_loss_and_grads(config, weights, inputs, targets, loss_weights, eps):
    """The oracle for gradients: MLX autodiff of the unchunked loss over full [batch, seq, vocab] logits."""
    model = BACKEND.build(config, weights, dtype="float32")
    ids, tgt, w = mx.array(inputs), mx.array(targets), mx.array(loss_weights)

    def loss_fn():
        logits = model(ids).logits.astype(mx.float32)  # [batch, seq, vocab]
        log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll = -mx.take_along_axis(log_probs, tgt[..., None], axis=-1)[..., 0]
        return (((1 - eps) * nll - eps * log_probs.mean(axis=-1)) * w).sum()

    loss, grads = nn.value_and_grad(model, loss_fn)()
    return float(loss), {name: np.array(g) for name, g in tree_flatten(grads)}


@pytest.mark.parametrize("overrides", [{}, UNTIED], ids=["tied", "untied-softcap"])
def test_chunked_loss_equals_the_naive_loss_in_value_and_gradient(overrides):
    spec = TrainSpec(loss_chunk_tokens=7, loss=SMOOTHED)  # 40 positions: 5 full chunks and a short one
    trainer, weights, config, (inputs, targets, loss_weights) = make(spec, **overrides)
    loss_weights[1, 10:14] = 0.0
    full_logits = reference.forward(config, weights, inputs)  # float64 [batch, seq, vocab]
    expected = naive_loss_sum(full_logits, targets, loss_weights, label_smoothing=0.1)
    for chunk in (7, 1, 1000):
        got = BACKEND.loss_sum(
            trainer.model, inputs, targets, loss_weights, chunk_tokens=chunk, label_smoothing=0.1
        )
        assert got == pytest.approx(expected, rel=1e-5), chunk
    assert trainer.accumulate(inputs, targets, loss_weights) == pytest.approx(expected, rel=1e-5)
    naive_loss, naive_grads = naive_mlx_loss_and_grads(config, weights, inputs, targets, loss_weights, 0.1)
    assert naive_loss == pytest.approx(expected, rel=1e-5)
    grads = trainer.gradients()
    assert set(grads) == set(naive_grads) == set(weights)
    assert ("lm_head.weight" in grads) == bool(overrides)
    for name, g in naive_grads.items():
        np.testing.assert_allclose(grads[name], g, rtol=0, atol=1e-5 * np.abs(g).max(), err_msg=name)


@pytest.mark.parametrize("overrides", [{}, UNTIED], ids=["tied", "untied-softcap"])
def test_a_frozen_head_or_backbone_leaves_the_other_gradients_unchanged(overrides):
    # Progressive unfreezing freezes the tied embedding (the head) until every block trains.
    spec = TrainSpec(loss_chunk_tokens=6)
    full, weights, config, batch = make(spec, **overrides)
    full.accumulate(*batch)
    expected = full.gradients()
    head = "lm_head.weight" if overrides else EMBED
    head_frozen, *_ = make(spec, **overrides)  # stage 2 computes no head-weight gradient
    head_frozen.set_lr_scales({head: 0.0})
    head_frozen.accumulate(*batch)
    assert set(head_frozen.gradients()) == set(expected) - {head}
    trainers = [head_frozen]
    if overrides:  # only the untied head trains: no backbone gradient pass at all
        only_head, *_ = make(spec, **overrides)
        only_head.set_lr_scales({name: 0.0 for name in weights if name != head})
        only_head.accumulate(*batch)
        assert set(only_head.gradients()) == {head}
        trainers.append(only_head)
    for trainer in trainers:
        for name, g in trainer.gradients().items():
            np.testing.assert_array_equal(g, expected[name], err_msg=name)


def accumulate_peak_bytes(vocab: int, chunk_tokens: int) -> tuple[int, int]:
    """(peak bytes allocated by one accumulate, bytes of the full float32 logits) on 2 x 512 tokens."""
    config, weights, inputs, targets, loss_weights = tiny_setup(0, batch=2, seq=512, vocab_size=vocab)
    trainer = BACKEND.trainer(
        BACKEND.build(config, weights, dtype="float32"), TrainSpec(loss_chunk_tokens=chunk_tokens)
    )
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    trainer.accumulate(inputs, targets, loss_weights)
    return mx.get_peak_memory() - base, inputs.size * vocab * 4


def test_logits_memory_stays_at_one_chunk():
    # What the head and loss add to an accumulate's peak memory, over the same model with a 32x smaller
    # vocabulary (same backbone): with chunks of 16 positions it must stay far below the full logits
    # (33.6 MB here; a chunk's are 0.5 MB). The head's own gradient buffers ([vocab, hidden], 2.1 MB
    # each, a few at once) count too: 1024 positions keep them small beside the logits they are not.
    # One chunk of everything shows that the measure would see the logits.
    baseline, _ = accumulate_peak_bytes(256, 16)
    chunked, full_logits = accumulate_peak_bytes(8192, 16)
    unchunked, _ = accumulate_peak_bytes(8192, 1024)
    assert unchunked - baseline > full_logits
    assert chunked - baseline < 0.5 * full_logits


# --- accumulation, checkpointing, precision ---------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_three_micro_batches_equal_one_batch_three_times_larger(optimizer):
    spec = TrainSpec(optimizer=OptimizerSpec(name=optimizer), loss_chunk_tokens=16)
    big, _, _, (inputs, targets, loss_weights) = make(spec, batch=6)
    small, *_ = make(spec, batch=6)
    tokens = float(loss_weights.sum())
    big_loss = big.accumulate(inputs, targets, loss_weights)
    rows = (slice(0, 2), slice(2, 4), slice(4, 6))
    small_loss = sum(small.accumulate(inputs[r], targets[r], loss_weights[r]) for r in rows)
    assert small_loss == pytest.approx(big_loss, rel=1e-6)
    g_big, g_small = big.gradients(), small.gradients()
    for name, g in g_big.items():  # float32 sums in another order: equal to 1e-6 of each gradient's scale
        np.testing.assert_allclose(g_small[name], g, rtol=0, atol=1e-6 * np.abs(g).max(), err_msg=name)
    big.apply(1e-3, tokens)
    small.apply(1e-3, tokens)
    got_big, got_small = BACKEND.weights(big.model), BACKEND.weights(small.model)
    for name, g in g_big.items():
        # AdamW's first step is lr * g / (|g| + eps): it turns the summation-order noise of a gradient
        # entry near zero (1e-8 of the scale) into a visible step difference, so those entries are left
        # out for AdamW. Adafactor's factored denominator does not amplify them: every entry is compared.
        keep = np.abs(g) > 1e-4 * np.abs(g).max() if optimizer == "adamw" else np.ones(g.shape, bool)
        assert keep.mean() > 0.9
        np.testing.assert_allclose(
            got_small[name][keep], got_big[name][keep], rtol=0, atol=1e-6, err_msg=name
        )


def test_grad_checkpointing_changes_nothing_and_half_precision_is_close():
    results = {}
    for key, spec in {
        "fp32": TrainSpec(),
        "remat": TrainSpec(grad_checkpointing=True),
        "bf16": TrainSpec(precision="bf16", grad_checkpointing=True),
        "fp16": TrainSpec(precision="fp16"),
    }.items():
        trainer, weights, _, batch = make(spec)
        results[key] = (trainer.accumulate(*batch), trainer.gradients())
        got = BACKEND.weights(trainer.model)
        assert all(got[k].dtype == np.float32 and np.array_equal(got[k], weights[k]) for k in weights)
    loss, grads = results["fp32"]
    loss_remat, grads_remat = results["remat"]
    assert loss_remat == pytest.approx(loss, rel=1e-6)
    for name in grads:
        np.testing.assert_allclose(
            grads_remat[name], grads[name], rtol=0, atol=1e-6 * np.abs(grads[name]).max()
        )
    for key in ("bf16", "fp16"):
        half_loss, half_grads = results[key]
        assert half_loss == pytest.approx(loss, rel=2e-2), key
        assert set(half_grads) == set(grads) and all(g.dtype == np.float32 for g in half_grads.values())
        flat = np.concatenate([g.ravel() for g in grads.values()])
        half = np.concatenate([half_grads[n].ravel() for n in grads])
        assert np.linalg.norm(half - flat) < 0.1 * np.linalg.norm(flat), key


def test_fp16_keeps_the_residual_stream_in_float32():
    # Gemma's residual stream outgrows float16 (65504) on real checkpoints. Post-norm weights of 2e4 make
    # every block add entries past it here: a float16 residual stream turns the loss into NaN (checked by
    # hand), the float32 one of the float16 policy gives the float32 loss.
    config, weights, inputs, targets, loss_weights = tiny_setup(0)
    weights = {k: np.full_like(v, 2e4) if ".post_" in k else v for k, v in weights.items()}
    losses = {}
    for precision in ("fp32", "fp16"):
        trainer = BACKEND.trainer(
            BACKEND.build(config, weights, dtype="float32"), TrainSpec(precision=precision)
        )
        losses[precision] = trainer.accumulate(inputs, targets, loss_weights)
        assert all(np.isfinite(g).all() for g in trainer.gradients().values()), precision
    assert losses["fp16"] == pytest.approx(losses["fp32"], rel=1e-3)


# --- optimizer state ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt", [OptimizerSpec(name="adamw"), OptimizerSpec(name="adafactor", beta1=0.9)])
def test_optimizer_state_round_trip_continues_bit_for_bit(opt):
    spec = TrainSpec(optimizer=dataclasses.replace(opt, weight_decay=0.05), loss_chunk_tokens=9)
    first, _, config, batch = make(spec)
    first.set_lr_scales({UP: 0.0, NORM: 0.3})
    tokens = float(batch[2].sum())
    for _ in range(2):
        first.accumulate(*batch)
        first.apply(1e-3, tokens)
    state = st_load(st_save(first.optimizer_state()))  # through safetensors, as checkpoints store it
    assert state[f"step/{NORM}"].tolist() == [2] and f"step/{UP}" not in state
    second = BACKEND.trainer(BACKEND.build(config, BACKEND.weights(first.model), dtype="float32"), spec)
    second.set_lr_scales({UP: 0.0, NORM: 0.3})
    second.load_optimizer_state(state)
    for trainer in (first, second):
        trainer.accumulate(*batch)
        trainer.apply(1e-3, tokens)
    a, b = BACKEND.weights(first.model), BACKEND.weights(second.model)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    for key, value in first.optimizer_state().items():
        assert np.array_equal(value, second.optimizer_state()[key]), key


def test_optimizer_state_that_does_not_fit_is_refused():
    trainer, *_, batch = make(TrainSpec())
    trainer.accumulate(*batch)
    trainer.apply(1e-3, 10.0)
    state = trainer.optimizer_state()
    fresh, *_ = make(TrainSpec())
    with pytest.raises(CheckpointError, match="model.nope.weight"):
        fresh.load_optimizer_state({**state, "exp_avg/model.nope.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=f"{NORM} holds exp_avg float32 \\[3\\]"):
        fresh.load_optimizer_state({**state, f"exp_avg/{NORM}": np.zeros(3, np.float32)})
