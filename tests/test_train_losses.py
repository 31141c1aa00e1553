"""The pluggable loss (gemmalab.train.losses) and the training batch (gemmalab.train.inputs): the numpy
formulas against hand derivations, then every backend's trainer against them, value and gradient, with
terms beyond plain cross-entropy, auxiliary terms on captured hidden states and attention probabilities,
and explicit positions and masks (Set Block Decoding's training layout).

The oracle for a backend is the float64 numpy reference (``reference.forward`` with capture) under
``losses.loss_sum``; gradients are checked as directional derivatives against central finite differences
of that same oracle, over every parameter at once and over the blocks below the captured layer."""

from __future__ import annotations

import numpy as np
import pytest
from train_oracles import check_directional_derivative, tiny_setup

from gemmalab import masks, reference
from gemmalab.backend import get_backend
from gemmalab.errors import InputError
from gemmalab.params import init_weights
from gemmalab.train import losses
from gemmalab.train.inputs import prepare
from gemmalab.train.losses import (
    AttentionKL,
    CrossEntropy,
    HiddenStateMSE,
    LossSpec,
    SoftTargetCrossEntropy,
)
from gemmalab.train.spec import TrainSpec


# --- the numpy formulas, by hand ----------------------------------------------------------------------------
def test_cross_entropy_by_hand():
    logits = np.array([[0.0, np.log(3.0)]])  # p = [1/4, 3/4]
    assert losses.cross_entropy(logits, np.array([1]))[0] == pytest.approx(-np.log(0.75))
    # smoothing 0.2: 0.8 * -log(3/4) + 0.2 * mean(-log(1/4), -log(3/4))
    expected = 0.8 * -np.log(0.75) + 0.2 * 0.5 * (-np.log(0.25) - np.log(0.75))
    assert losses.cross_entropy(logits, np.array([1]), 0.2)[0] == pytest.approx(expected)


def test_soft_target_cross_entropy_by_hand():
    logits = np.array([[0.0, 2 * np.log(3.0)]])  # at T = 2: softmax(z / 2) = [1/4, 3/4]
    q = np.array([[0.5, 0.5]])
    expected = 4 * -(0.5 * np.log(0.25) + 0.5 * np.log(0.75))  # T^2 * cross-entropy
    assert losses.soft_target_cross_entropy(logits, q, 2.0)[0] == pytest.approx(expected)
    # one-hot targets at T = 1 are the plain cross-entropy
    onehot = np.array([[0.0, 1.0]])
    assert losses.soft_target_cross_entropy(logits, onehot)[0] == pytest.approx(losses.cross_entropy(logits, [1])[0])


def test_aux_formulas_by_hand():
    h = np.array([[[1.0, 2.0], [0.0, 0.0]]])  # [batch 1, seq 2, features 2]
    t = np.array([[[0.0, 0.0], [1.0, 3.0]]])
    np.testing.assert_allclose(losses.hidden_state_mse(h, t), [[2.5, 5.0]])
    # KL([1, 0] || [1/2, 1/2]) = log 2 (the zero target term is 0, not NaN); two heads, the other KL 0
    target = np.array([[[[1.0, 0.0]], [[0.5, 0.5]]]])  # [batch 1, heads 2, seq 1, keys 2]
    probs = np.array([[[[0.5, 0.5]], [[0.5, 0.5]]]])
    np.testing.assert_allclose(losses.attention_kl(probs, target), [[np.log(2) / 2]])


def test_loss_spec_rejects_what_it_cannot_compute():
    with pytest.raises(InputError, match="at least one term"):
        LossSpec(head=())
    with pytest.raises(InputError, match="put it in aux"):
        LossSpec(head=(HiddenStateMSE(layer=1, targets="h"),))
    with pytest.raises(InputError, match="label_smoothing"):
        CrossEntropy(label_smoothing=1.0)
    with pytest.raises(InputError, match="temperature"):
        SoftTargetCrossEntropy(temperature=0.0)
    with pytest.raises(InputError, match="weight"):
        HiddenStateMSE(layer=1, targets="h", weight=float("nan"))


def test_prepare_checks_extras_and_layers():
    config, _, inputs, targets, loss_weights = tiny_setup(0)
    spec = LossSpec(aux=(HiddenStateMSE(layer=3, targets="h3"),))
    good = np.zeros(inputs.shape + (config.hidden_size,), np.float32)
    assert prepare(config, spec, inputs, targets, loss_weights, extras={"h3": good}).hidden_layers == (3,)
    with pytest.raises(InputError, match="does not carry"):
        prepare(config, spec, inputs, targets, loss_weights)
    with pytest.raises(InputError, match="no loss term reads"):
        prepare(config, spec, inputs, targets, loss_weights, extras={"h3": good, "other": good})
    with pytest.raises(InputError, match="shape"):
        prepare(config, spec, inputs, targets, loss_weights, extras={"h3": good[..., :-1]})
    with pytest.raises(InputError, match="NaN"):
        prepare(config, spec, inputs, targets, loss_weights, extras={"h3": good * np.nan})
    too_deep = LossSpec(aux=(HiddenStateMSE(layer=config.num_hidden_layers + 1, targets="h"),))
    with pytest.raises(InputError, match="hidden state"):
        prepare(config, too_deep, inputs, targets, loss_weights, extras={"h": good})
    with pytest.raises(InputError, match="attend to no key"):
        prepare(config, LossSpec(), inputs, targets, loss_weights, mask=np.zeros((20, 20), bool))


# --- every backend against the reference ----------------------------------------------------------------------
def teacher(config, inputs, positions=None, mask=None):
    """Captures of another random model on the same tokens: realistic targets for the aux terms (the
    attention targets are zero wherever the mask forbids a key)."""
    _, captured = reference.forward(config, init_weights(config, seed=7, dtype="float32"), inputs,
                                    positions=positions, mask=mask, capture=True)
    return captured


def oracle_loss(spec, config, weights, inputs, targets, loss_weights, extras, positions=None, mask=None) -> float:
    logits, captured = reference.forward(config, weights, inputs, positions=positions, mask=mask, capture=True)
    return losses.loss_sum(spec, logits, targets, loss_weights, extras,
                           dict(enumerate(captured["hidden_states"])), dict(enumerate(captured["attentions"])))


def check_gradient(grads, spec, config, weights, batch, extras, names, positions=None, mask=None, seed=0):
    """grads . d against the central difference of the oracle along a random direction d over ``names``."""
    check_directional_derivative(
        grads, lambda w: oracle_loss(spec, config, w, *batch, extras, positions, mask), weights, names, seed
    )


def below(config, layer: int, weights) -> list[str]:
    """The parameters of the blocks under hidden state ``layer``, and the embedding."""
    return ["model.embed_tokens.weight"] + [name for name in weights if name.startswith("model.layers.")
                                            and int(name.split(".")[2]) < layer]


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_soft_targets_and_a_hidden_state_term_equal_the_reference(backend, softcap):
    overrides = {} if softcap is None else {"tie_word_embeddings": False, "final_logit_softcapping": softcap}
    config, weights, inputs, targets, loss_weights = tiny_setup(0, **overrides)
    rng = np.random.default_rng(3)
    soft = rng.dirichlet(np.full(config.vocab_size, 0.3), size=inputs.shape).astype(np.float32)
    extras = {"soft": soft, "h3": teacher(config, inputs)["hidden_states"][3].astype(np.float32)}
    spec = LossSpec(
        head=(CrossEntropy(label_smoothing=0.1, weight=0.5), SoftTargetCrossEntropy("soft", temperature=2.0, weight=1.5)),
        aux=(HiddenStateMSE(layer=3, targets="h3", weight=0.7),),
    )
    b = get_backend(backend)
    trainer = b.trainer(b.build(config, weights, dtype="float32"), TrainSpec(loss=spec, loss_chunk_tokens=7))
    got = trainer.accumulate(inputs, targets, loss_weights, extras=extras)
    expected = oracle_loss(spec, config, weights, inputs, targets, loss_weights, extras)
    assert got == pytest.approx(expected, rel=1e-5)
    # each term counts: without the aux term (or the soft one) the value is another
    assert abs(oracle_loss(LossSpec(head=spec.head), config, weights, inputs, targets, loss_weights, extras)
               - expected) > 1e-3 * expected
    grads = trainer.gradients()
    batch = (inputs, targets, loss_weights)
    check_gradient(grads, spec, config, weights, batch, extras, list(weights))
    check_gradient(grads, spec, config, weights, batch, extras, below(config, 3, weights), seed=1)


def test_an_attention_term_trains_through_the_captured_probabilities(backend):
    config, weights, inputs, targets, loss_weights = tiny_setup(1)
    layer = config.layer_types.index("full_attention")  # a global layer: every earlier key counts
    extras = {"att": teacher(config, inputs)["attentions"][layer].astype(np.float32)}
    spec = LossSpec(aux=(AttentionKL(layer=layer, targets="att", weight=3.0),))
    b = get_backend(backend)
    trainer = b.trainer(b.build(config, weights, dtype="float32"), TrainSpec(loss=spec, loss_chunk_tokens=16))
    got = trainer.accumulate(inputs, targets, loss_weights, extras=extras)
    assert got == pytest.approx(oracle_loss(spec, config, weights, inputs, targets, loss_weights, extras), rel=1e-5)
    grads = trainer.gradients()
    names = [n for n in below(config, layer + 1, weights) if f"layers.{layer}.mlp" not in n]
    check_gradient(grads, spec, config, weights, (inputs, targets, loss_weights), extras, names)


def test_set_block_training_layout_trains_against_the_reference(backend):
    # Set Block Decoding's training input: a clean copy and a masked copy of 10 tokens each (20 > window 8),
    # positions repeated, blocks of 4; a masked token's target is its clean twin's next token.
    config, weights, tokens, _, _ = tiny_setup(2, batch=2, seq=10)
    positions, mask = masks.set_block_training(10, 4)
    mask_token = config.vocab_size - 1
    inputs = np.concatenate([tokens, np.full_like(tokens, mask_token)], axis=1)  # [2, 20]
    rng = np.random.default_rng(5)
    targets = rng.integers(0, config.vocab_size, inputs.shape).astype(np.int32)
    loss_weights = np.concatenate([np.zeros_like(tokens), np.ones_like(tokens)], axis=1).astype(np.float32)
    spec = LossSpec()
    b = get_backend(backend)
    trainer = b.trainer(b.build(config, weights, dtype="float32"), TrainSpec(loss=spec, loss_chunk_tokens=16))
    got = trainer.accumulate(inputs, targets, loss_weights, positions=positions, mask=mask)
    expected = oracle_loss(spec, config, weights, inputs, targets, loss_weights, {}, positions, mask)
    assert got == pytest.approx(expected, rel=1e-5)
    # the layout matters: the same tokens with the default causal rule give another loss
    assert abs(oracle_loss(spec, config, weights, inputs, targets, loss_weights, {}) - expected) > 1e-3 * expected
    check_gradient(trainer.gradients(), spec, config, weights, (inputs, targets, loss_weights), {}, list(weights),
                   positions, mask)
