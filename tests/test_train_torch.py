"""PyTorch-only training checks that the backend-generic suite (test_train_backends.py) cannot make: the
hand-written gradient of the fused chunked cross-entropy against autograd through a naive full-logits loss,
the absence of [tokens, vocab] tensors, Adafactor's momentum, freezing mid-run, fp16 loss scaling and the
input errors. Every expected value comes from numpy written here, tests/train_oracles.py, or autograd
through plain torch ops, never from backends/gemmalab_torch/training.py itself."""

from __future__ import annotations

import numpy as np
import pytest
from train_oracles import naive_loss_sum, reference_loss_sum, tiny_setup

from gemmalab.errors import InputError
from gemmalab.train.losses import CrossEntropy, LossSpec
from gemmalab.train.spec import OptimizerSpec, TrainSpec

torch = pytest.importorskip("torch")
from gemmalab_torch import BACKEND  # noqa: E402  (after the importorskip)
from gemmalab_torch.training import chunked_head_loss  # noqa: E402

UP = "model.layers.0.mlp.up_proj.weight"
NORM = "model.layers.2.post_attention_layernorm.weight"

SMOOTHED = LossSpec(head=(CrossEntropy(label_smoothing=0.1),))


def make(spec: TrainSpec, seed: int = 0, **setup):
    config, weights, inputs, targets, loss_weights = tiny_setup(seed, **setup)
    model = BACKEND.build(config, weights, dtype="float32")
    return BACKEND.trainer(model, spec), config, weights, (inputs, targets, loss_weights)


def naive_torch_loss(logits, targets, weights, smoothing: float):
    """sum(weights * token loss) from full float32 logits [n, vocab], with plain differentiable torch ops."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    nll = -log_probs.gather(-1, targets[:, None])[:, 0]
    per_token = (1 - smoothing) * nll + smoothing * -log_probs.mean(dim=-1)
    return (per_token * weights).sum()


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_head_loss_and_gradient_equal_the_naive_loss(softcap):
    rng = np.random.default_rng(0)
    n, dim, vocab, chunk = 23, 16, 50, 5  # 23 = four full chunks and a partial one
    hidden_np = rng.normal(0, 1, (n, dim)).astype(np.float32)
    matrix_np = rng.normal(0, 0.5, (vocab, dim)).astype(np.float32)
    targets_np = rng.integers(0, vocab, n)
    weights_np = rng.uniform(0.5, 2.0, n).astype(np.float32)
    weights_np[[0, 7, 8]] = 0.0
    logits_np = hidden_np.astype(np.float64) @ matrix_np.astype(np.float64).T
    if softcap is not None:
        logits_np = np.tanh(logits_np / softcap) * softcap
    expected = naive_loss_sum(logits_np, targets_np, weights_np, label_smoothing=0.1)

    def leaves():
        return (torch.tensor(hidden_np, requires_grad=True), torch.tensor(matrix_np, requires_grad=True))

    hidden, matrix = leaves()
    targets, weights = torch.tensor(targets_np), torch.tensor(weights_np)
    loss = chunked_head_loss(
        matrix, hidden, targets, weights, terms=SMOOTHED.head, chunk_tokens=chunk, softcap=softcap
    )
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    (2.5 * loss).backward()  # an upstream factor (the loss scale) must reach both gradients

    hidden_ref, matrix_ref = leaves()
    logits = hidden_ref @ matrix_ref.T  # [n, vocab]: fine at this size, that is what the fused loss avoids
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    (2.5 * naive_torch_loss(logits, targets, weights, 0.1)).backward()
    for got, want in ((hidden.grad, hidden_ref.grad), (matrix.grad, matrix_ref.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert float(hidden.grad[0].abs().max()) == 0.0  # zero-weight positions contribute nothing (and no NaN)


@pytest.mark.parametrize("tied", [True, False])
def test_trainer_gradients_equal_autograd_through_full_logits(tied):
    overrides = {} if tied else {"tie_word_embeddings": False, "final_logit_softcapping": 3.0}
    spec = TrainSpec(loss_chunk_tokens=7, loss=SMOOTHED)
    trainer, config, weights, (inputs, targets, loss_weights) = make(spec, **overrides)
    loss = trainer.accumulate(inputs, targets, loss_weights)
    expected = reference_loss_sum(config, weights, inputs, targets, loss_weights, label_smoothing=0.1)
    assert loss == pytest.approx(expected, rel=1e-5)

    naive = BACKEND.build(config, weights, dtype="float32")
    params = dict(naive.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    logits = naive(torch.from_numpy(inputs.astype(np.int64))).logits  # [batch, seq, vocab], every position
    naive_torch_loss(
        logits.reshape(-1, config.vocab_size),
        torch.from_numpy(targets.reshape(-1).astype(np.int64)),
        torch.from_numpy(loss_weights.reshape(-1)),
        0.1,
    ).backward()
    grads = trainer.gradients()
    assert set(grads) == set(params)
    for name, p in params.items():
        want = p.grad.numpy()
        np.testing.assert_allclose(grads[name], want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=name)


def test_no_tensor_holds_every_position_logits():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        """Records the largest element count of any tensor an op produces (forward and backward)."""

        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    chunk = 8
    trainer, config, _, (inputs, targets, loss_weights) = make(TrainSpec(loss_chunk_tokens=chunk), seq=40)
    with Largest() as mode:
        trainer.accumulate(inputs, targets, loss_weights)
    # 80 positions x 261 vocab would be 20880; a chunk's logits are 8 x 261, the embedding 261 x 64
    assert mode.largest < inputs.size * config.vocab_size
    assert mode.largest <= max(chunk * config.vocab_size, config.vocab_size * config.hidden_size)


def test_adafactor_state_names():
    opt = OptimizerSpec(name="adafactor", beta1=0.9)
    trainer, config, weights, batch = make(TrainSpec(optimizer=opt, loss_chunk_tokens=16))
    trainer.accumulate(*batch)
    trainer.apply(3e-3, float(batch[2].sum()))
    assert {f"exp_avg/{UP}", f"exp_avg_sq_row/{UP}", f"exp_avg_sq_col/{UP}", f"exp_avg_sq/{NORM}"} <= set(
        trainer.optimizer_state()
    )


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_freezing_mid_run_keeps_weights_and_state_bit_identical(optimizer):
    spec = TrainSpec(optimizer=OptimizerSpec(name=optimizer, weight_decay=0.1))
    trainer, config, weights, batch = make(spec)
    tokens = float(batch[2].sum())
    trainer.accumulate(*batch)
    trainer.apply(1e-2, tokens)
    # BACKEND.weights gives live views of the parameters on CPU: copy to keep a snapshot
    before_weights = {k: v.copy() for k, v in BACKEND.weights(trainer.model).items()}
    before_state = trainer.optimizer_state()
    trainer.set_lr_scales({UP: 0.0})
    trainer.accumulate(*batch)
    assert UP not in trainer.gradients()
    trainer.apply(1e-2, tokens)
    after_weights, after_state = BACKEND.weights(trainer.model), trainer.optimizer_state()
    assert np.array_equal(after_weights[UP], before_weights[UP])
    frozen_keys = [k for k in before_state if k.endswith("/" + UP)]
    assert frozen_keys and all(np.array_equal(after_state[k], before_state[k]) for k in frozen_keys)
    assert not np.array_equal(after_weights[NORM], before_weights[NORM])


def test_frozen_from_the_start_has_no_optimizer_state():
    trainer, _, _, batch = make(TrainSpec())
    trainer.set_lr_scales({UP: 0.0})
    trainer.accumulate(*batch)
    trainer.apply(1e-3, float(batch[2].sum()))
    state = trainer.optimizer_state()
    assert not any(k.endswith("/" + UP) for k in state) and any(k.endswith("/" + NORM) for k in state)


def test_fp16_with_loss_scale_matches_fp32_and_overflow_updates_nothing():
    results = {}
    for precision, scale in (("fp32", 1.0), ("fp16", 8.0)):
        trainer, *_, batch = make(TrainSpec(precision=precision))
        loss = trainer.accumulate(*batch, loss_scale=scale)
        results[precision] = loss, {k: g / scale for k, g in trainer.gradients().items()}
    (loss, grads), (loss16, grads16) = results["fp32"], results["fp16"]
    assert loss16 == pytest.approx(loss, rel=1e-2)  # the unscaled loss comes back
    for name, g in grads.items():
        assert grads16[name].dtype == np.float32
        np.testing.assert_allclose(grads16[name], g, rtol=0, atol=2e-2 * np.abs(g).max(), err_msg=name)
    # The loss is a sum over tokens, so a large scale overflows fp16 in the backward pass: the step is skipped.
    trainer, _, weights, batch = make(TrainSpec(precision="fp16"))
    trainer.accumulate(*batch, loss_scale=2.0**15)
    assert not np.isfinite(trainer.apply(1e-3, float(batch[2].sum()) * 2.0**15)["grad_norm"])
    got = BACKEND.weights(trainer.model)
    assert all(np.array_equal(got[k], weights[k]) for k in weights) and trainer.optimizer_state() == {}


def test_bad_batches_and_dtypes_raise_input_errors():
    trainer, config, weights, (inputs, targets, loss_weights) = make(TrainSpec())
    with pytest.raises(InputError, match="shape"):
        trainer.accumulate(inputs, targets[:, :-1], loss_weights)
    with pytest.raises(InputError, match="token ids"):
        trainer.accumulate(inputs, np.full_like(targets, config.vocab_size), loss_weights)
    with pytest.raises(InputError, match="token ids"):
        trainer.accumulate(inputs.astype(np.float32), targets, loss_weights)
    with pytest.raises(InputError, match="float32"):
        BACKEND.trainer(BACKEND.build(config, weights, dtype="bfloat16"), TrainSpec())


@pytest.mark.parametrize("head_trains", [True, False])
def test_a_frozen_head_gets_no_gradient_matmul(head_trains):
    # The head loss does its backward matmuls in its forward pass; the [vocab, dim] one must be skipped when
    # the head is frozen. Counted by hand: logits 2nVd, d(hidden) 2nVd, d(matrix) 2nVd.
    from torch.utils.flop_counter import FlopCounterMode

    n, dim, vocab = 24, 16, 64
    hidden = torch.randn(n, dim, requires_grad=True)
    matrix = torch.randn(vocab, dim, requires_grad=head_trains)
    targets, weights = torch.randint(0, vocab, (n,)), torch.ones(n)
    with FlopCounterMode(display=False) as counter:
        chunked_head_loss(matrix, hidden, targets, weights, terms=SMOOTHED.head, chunk_tokens=8).backward()
    assert counter.get_total_flops() == (6 if head_trains else 4) * n * vocab * dim
    assert (matrix.grad is not None) == head_trains and hidden.grad is not None
