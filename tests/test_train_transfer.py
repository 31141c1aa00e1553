"""Feature transfer from a frozen companion (gemmalab.train.transfer): hidden states through a learned
projection and attention rows, GQA-aware. First the numpy definitions and the head grouping against hand
derivations; then every backend's trainer against the float64 numpy reference -- the loss, its per-term
sums and its gradient (the student's weights and the projections), with a teacher of another width, other
head counts and another window, local student blocks mapped onto a global teacher block, a packed batch --
and the projections through optimizer steps and a resume.

The oracle of a backend is ``reference.forward(..., capture=True)`` of both models in float64 under
``losses.loss_sum`` with the teacher's captures; gradients are directional derivatives against central
finite differences of that oracle (train_oracles.check_directional_derivative)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from train_oracles import check_directional_derivative, tiny_setup

from gemmalab import reference
from gemmalab.backend import get_backend
from gemmalab.errors import InputError
from gemmalab.params import init_weights
from gemmalab.train import losses, transfer
from gemmalab.train.losses import AttentionTransfer, CrossEntropy, HiddenStateTransfer, LossSpec
from gemmalab.train.spec import OptimizerSpec, TrainSpec


# --- the numpy definitions, by hand -------------------------------------------------------------------------
def test_head_groups_by_hand():
    # same heads and kv heads: head to head
    student, teacher = transfer.head_groups(4, 2, 4, 2)
    np.testing.assert_array_equal(student, np.eye(4))
    np.testing.assert_array_equal(teacher, np.eye(4))
    # 4 heads over 2 kv heads against 8 over 4: gcd(2, 4) = 2 groups; the student's kv groups as they are
    # (heads 0-1, 2-3), the teacher's in pairs of kv groups (heads 0-3, 4-7)
    student, teacher = transfer.head_groups(4, 2, 8, 4)
    np.testing.assert_array_equal(student, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_array_equal(teacher, [[0.25] * 4 + [0] * 4, [0] * 4 + [0.25] * 4])
    # the same heads over other kv heads (4 over 2 against 4 over 4): gcd 2, not head to head
    student, teacher = transfer.head_groups(4, 2, 4, 4)
    np.testing.assert_array_equal(student, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_array_equal(teacher, student)
    # 2 kv heads against 3: gcd 1, the mean over every head (Gemma 3 270M: 4 heads over 1 kv head)
    student, teacher = transfer.head_groups(4, 2, 6, 3)
    np.testing.assert_array_equal(student, [[0.25] * 4])
    np.testing.assert_allclose(teacher, [[1 / 6] * 6])
    with pytest.raises(InputError, match="whole number of query heads"):
        transfer.head_groups(4, 3, 4, 2)


def test_attention_transfer_by_hand():
    # one row of 2 queries over 2 keys; query 0 sees key 0 only (causal)
    student = np.array([[[[1, 0], [0.2, 0.8]], [[1, 0], [0.6, 0.4]]]])  # [1, 2 heads, 2, 2]
    teacher = np.array([[[[1, 0], [0.5, 0.5]], [[1, 0], [0.7, 0.3]]]])
    # student 2 heads over 1 kv head, teacher 2 over 2: gcd 1, each model's mean over its two heads
    groups = transfer.head_groups(2, 1, 2, 2)
    got = transfer.attention_transfer(student, teacher, *groups)
    s, t = [0.4, 0.6], [0.6, 0.4]  # the means of query 1
    by_hand = t[0] * math.log(t[0] / s[0]) + t[1] * math.log(t[1] / s[1])
    np.testing.assert_allclose(got, [[0.0, by_hand]], rtol=1e-12)
    # head to head (same heads and kv heads): the mean over heads of each head's KL
    got = transfer.attention_transfer(student, teacher, *transfer.head_groups(2, 1, 2, 1))
    kl = [0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8), 0.7 * math.log(0.7 / 0.6) + 0.3 * math.log(0.3 / 0.4)]
    np.testing.assert_allclose(got, [[0.0, np.mean(kl)]], rtol=1e-12)
    # at temperature 2 a row softmax(z) becomes softmax(z / 2): p^(1/2), renormalised
    hot = transfer.attention_transfer(student[:, :1], teacher[:, :1], *transfer.head_groups(1, 1, 1, 1), temperature=2.0)
    s2 = np.sqrt([0.2, 0.8]) / np.sqrt([0.2, 0.8]).sum()
    t2 = np.array([0.5, 0.5])
    np.testing.assert_allclose(hot, [[0.0, float((t2 * np.log(t2 / s2)).sum())]], rtol=1e-12)


def test_the_teacher_row_is_renormalised_over_the_keys_the_student_sees():
    # query 1 of a local student layer with a window of 1 sees key 1 only; the global teacher layer spreads
    # 0.3 / 0.7 over keys 0 and 1. Over the student's keys the teacher's row is [0, 1]: no divergence (and
    # without the restriction KL would be infinite, the student giving key 0 no mass).
    student = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    teacher = np.array([[[[1.0, 0.0], [0.3, 0.7]]]])
    got = transfer.attention_transfer(student, teacher, *transfer.head_groups(1, 1, 1, 1))
    np.testing.assert_allclose(got, [[0.0, 0.0]], atol=1e-15)


def test_hidden_transfer_by_hand():
    h, t = np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]])
    np.testing.assert_allclose(transfer.hidden_transfer(h, t, "cosine"), [1 - 1 / math.sqrt(2)], rtol=1e-12)
    np.testing.assert_allclose(transfer.hidden_transfer(2 * h, t, "cosine"), [1 - 1 / math.sqrt(2)], rtol=1e-12)
    # through a projection [3, 2] from width 2 to width 3: P h = [1, 2, 3]
    projection = np.array([[1.0, 0.0], [2.0, 5.0], [3.0, 1.0]])
    target = np.array([[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(transfer.hidden_transfer(h, target, "mse", projection), [(0 + 4 + 9) / 3], rtol=1e-12)
    np.testing.assert_allclose(transfer.hidden_transfer(h, target, "cosine", projection), [1 - 1 / math.sqrt(14)],
                               rtol=1e-12)


def test_loss_parameters_are_shaped_checked_and_seeded():
    config = tiny_setup(0)[0]
    teacher = wide_teacher(config)
    spec = LossSpec(transfer=(HiddenStateTransfer(3, 2, projection="proj.3"), HiddenStateTransfer(6, 4, projection="proj.6"),
                              AttentionTransfer(5, 3)))
    shapes = transfer.loss_parameter_shapes(spec, config, {"teacher": teacher})
    assert shapes == {"proj.3": (96, 64), "proj.6": (96, 64)}
    fresh = transfer.init_loss_parameters(shapes, seed=3)
    assert all(np.abs(v).max() <= 1 / math.sqrt(64) for v in fresh.values())
    np.testing.assert_array_equal(fresh["proj.3"], transfer.init_loss_parameters(shapes, seed=3)["proj.3"])
    assert not np.array_equal(fresh["proj.3"], fresh["proj.6"])
    # names alike but for their last character draw apart too (each draw hashes the whole name)
    alike = transfer.init_loss_parameters({"hidden_projection.0": (3, 4), "hidden_projection.1": (3, 4)})
    assert not np.array_equal(alike["hidden_projection.0"], alike["hidden_projection.1"])
    with pytest.raises(InputError, match="needs a projection"):
        transfer.loss_parameter_shapes(LossSpec(transfer=(HiddenStateTransfer(3, 2),)), config, {"teacher": teacher})
    with pytest.raises(InputError, match="has the name of a parameter of the student"):
        transfer.loss_parameter_shapes(LossSpec(transfer=(HiddenStateTransfer(3, 2, projection="model.norm.weight"),)),
                                       config, {"teacher": teacher})
    with pytest.raises(InputError, match="block 4, but it has 4"):
        transfer.loss_parameter_shapes(LossSpec(transfer=(AttentionTransfer(1, 4),)), config, {"teacher": teacher})
    with pytest.raises(InputError, match="shape \\[64, 64\\], not \\[96, 64\\]"):
        transfer.check_loss_parameters({**fresh, "proj.3": np.zeros((64, 64), np.float32)}, shapes)
    with pytest.raises(InputError, match="'proj.6' \\[96, 64\\] is missing"):
        transfer.check_loss_parameters({"proj.3": fresh["proj.3"]}, shapes)


# --- the backends against the reference ---------------------------------------------------------------------
def wide_teacher(config, seed: int = 10):
    """A teacher unlike the student: hidden 96 (not 64), 8 heads over 4 kv heads (not 4 over 2: a common form
    of 2 groups), 4 blocks (3 local, then global) with a window of 6 (not 8), 64 more ids."""
    return dataclasses.replace(config, vocab_size=config.vocab_size + 64, hidden_size=96, num_attention_heads=8,
                               num_key_value_heads=4, num_hidden_layers=4, sliding_window=6, name="teacher",
                               layer_types=("sliding_attention",) * 3 + ("full_attention",))


def with_random_norms(config, seed: int) -> dict[str, np.ndarray]:
    weights = init_weights(config, seed=seed, dtype="float32")
    rng = np.random.default_rng(seed)
    for name, value in weights.items():
        if name.endswith("norm.weight"):
            weights[name] = rng.normal(0.0, 0.3, value.shape).astype(np.float32)
    return weights


# CE, a cosine and an MSE hidden-state transfer through projections (the second on the final-normed states),
# attention on the global blocks at temperature 2, and a local student block onto the global teacher block;
# query chunks of 7 rows over 20 queries (the last chunk partial).
WIDE_SPEC = LossSpec(
    head=(CrossEntropy(weight=0.5),),
    transfer=(
        HiddenStateTransfer(3, 2, metric="cosine", projection="proj.3", weight=2.0),
        HiddenStateTransfer(6, 4, metric="mse", projection="proj.6", weight=0.1),
        AttentionTransfer(5, 3, temperature=2.0, query_chunk=7, weight=4.0),
        AttentionTransfer(2, 3, query_chunk=7),
    ),
)


def oracle(spec, config, weights, teacher_config, teacher_weights, batch, projections, positions=None, mask=None):
    """(loss sum, term sums) of the float64 reference student against the reference teacher's captures."""
    inputs, targets, loss_weights = batch
    logits, captured = reference.forward(config, weights, inputs, positions=positions, mask=mask, capture=True)
    _, teacher = reference.forward(teacher_config, teacher_weights, inputs, positions=positions, mask=mask, capture=True)
    groups = transfer.head_groups(config.num_attention_heads, config.num_key_value_heads,
                                  teacher_config.num_attention_heads, teacher_config.num_key_value_heads)
    kwargs = dict(hidden_states=dict(enumerate(captured["hidden_states"])), attentions=dict(enumerate(captured["attentions"])),
                  companion_captures={"teacher": teacher}, companion_groups={"teacher": groups},
                  loss_parameters=projections)
    return (losses.loss_sum(spec, logits, targets, loss_weights, **kwargs),
            losses.term_sums(spec, logits, targets, loss_weights, **kwargs))


def check_against_oracle(backend, spec, config, weights, teacher_config, teacher_weights, batch, projections,
                         positions=None, mask=None):
    b = get_backend(backend)
    teacher = b.build(teacher_config, teacher_weights, dtype="float32")
    trainer = b.trainer(b.build(config, weights, dtype="float32"), TrainSpec(loss=spec, loss_chunk_tokens=7),
                        companions={"teacher": teacher}, loss_parameters=projections)
    got = trainer.accumulate(*batch, positions=positions, mask=mask)
    expected, sums = oracle(spec, config, weights, teacher_config, teacher_weights, batch, projections, positions, mask)
    assert got == pytest.approx(expected, rel=1e-5)
    assert list(trainer.term_sums()) == list(sums)
    for name, value in sums.items():
        assert trainer.term_sums()[name] == pytest.approx(value, rel=1e-4), name
    grads = trainer.gradients()
    assert set(projections) <= set(grads)
    everything = {**weights, **projections}

    def loss_of(w):
        student = {k: v for k, v in w.items() if k in weights}
        return oracle(spec, config, student, teacher_config, teacher_weights, batch,
                      {k: w[k] for k in projections}, positions, mask)[0]

    check_directional_derivative(grads, loss_of, everything, list(everything))
    # The cross-entropy dwarfs the transfer terms along a random direction: check their part on its own too,
    # the whole gradient less the cross-entropy's (a plain trainer on the same batch).
    plain = b.trainer(b.build(config, weights, dtype="float32"), TrainSpec(loss=LossSpec(head=spec.head), loss_chunk_tokens=7))
    plain.accumulate(*batch, positions=positions, mask=mask)
    ce = plain.gradients()
    transfer_part = {name: grads[name].astype(np.float64) - ce.get(name, 0.0) for name in everything}
    only = LossSpec(head=(CrossEntropy(weight=0.0),), transfer=spec.transfer)
    check_directional_derivative(
        transfer_part,
        lambda w: oracle(only, config, {k: v for k, v in w.items() if k in weights}, teacher_config, teacher_weights,
                         batch, {k: w[k] for k in projections}, positions, mask)[0],
        everything, list(everything), seed=1,
    )
    return trainer


def test_transfer_through_projections_against_the_reference(backend):
    config, weights, inputs, targets, loss_weights = tiny_setup(0)
    teacher_config = wide_teacher(config)
    teacher_weights = with_random_norms(teacher_config, 10)
    shapes = transfer.loss_parameter_shapes(WIDE_SPEC, config, {"teacher": teacher_config})
    projections = transfer.init_loss_parameters(shapes, seed=5)
    total, sums = oracle(WIDE_SPEC, config, weights, teacher_config, teacher_weights, (inputs, targets, loss_weights),
                         projections)
    for name, term in zip(sums, WIDE_SPEC.terms, strict=True):  # every term counts in the loss
        assert term.weight * sums[name] > 0.01 * total, name
    check_against_oracle(backend, WIDE_SPEC, config, weights, teacher_config, teacher_weights,
                         (inputs, targets, loss_weights), projections)


def test_head_to_head_transfer_on_a_packed_batch(backend):
    # a teacher with the student's heads and width (head to head, no projection) and 2 blocks, on one row
    # holding two documents: positions restart and each token sees its own document only
    config, weights, _, _, _ = tiny_setup(1)
    teacher_config = dataclasses.replace(config, num_hidden_layers=2, layer_types=("sliding_attention", "full_attention"),
                                         sliding_window=5, name="teacher")
    teacher_weights = with_random_norms(teacher_config, 11)
    lengths = (12, 9)
    document = np.repeat(np.arange(len(lengths)), lengths)
    positions = np.concatenate([np.arange(n) for n in lengths])
    mask = (document[:, None] == document[None, :]) & (positions[None, :] <= positions[:, None])
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.vocab_size, size=(1, sum(lengths) + 1)).astype(np.int32)
    batch = (tokens[:, :-1], tokens[:, 1:], np.ones((1, sum(lengths)), np.float32))
    spec = LossSpec(head=(CrossEntropy(weight=0.2),),
                    transfer=(HiddenStateTransfer(2, 1, metric="cosine"), AttentionTransfer(0, 0, query_chunk=5),
                              AttentionTransfer(5, 1, temperature=0.5, query_chunk=64)))
    check_against_oracle(backend, spec, config, weights, teacher_config, teacher_weights, batch, {},
                         positions=positions, mask=mask)


def test_projections_train_and_resume_bit_for_bit(backend):
    config, weights, inputs, targets, loss_weights = tiny_setup(2)
    teacher_config = wide_teacher(config)
    b = get_backend(backend)
    teacher = b.build(teacher_config, with_random_norms(teacher_config, 12), dtype="float32")
    spec = TrainSpec(loss=WIDE_SPEC, loss_chunk_tokens=7, optimizer=OptimizerSpec(weight_decay=0.1))
    shapes = transfer.loss_parameter_shapes(WIDE_SPEC, config, {"teacher": teacher_config})
    start = transfer.init_loss_parameters(shapes, seed=0)

    def step(trainer):
        trainer.accumulate(inputs, targets, loss_weights)
        return trainer.apply(1e-2, float(loss_weights.sum()))

    first = b.trainer(b.build(config, weights, dtype="float32"), spec, companions={"teacher": teacher})
    np.testing.assert_array_equal(first.loss_parameters()["proj.3"], start["proj.3"])  # seed 0 by default
    step(first)
    state = first.optimizer_state()
    assert {"step/proj.3", "exp_avg/proj.3", "exp_avg_sq/proj.6"} <= set(state)
    moved = first.loss_parameters()
    assert not np.allclose(moved["proj.3"], start["proj.3"])
    # a fresh trainer from the weights, optimizer state and projections continues as the first does
    resumed = b.trainer(b.build(config, b.weights(first.model), dtype="float32"), spec, companions={"teacher": teacher},
                        loss_parameters=moved)
    resumed.load_optimizer_state(state)
    step(first)
    step(resumed)
    for name, value in first.loss_parameters().items():
        np.testing.assert_array_equal(resumed.loss_parameters()[name], value)
    for name, value in b.weights(first.model).items():
        np.testing.assert_array_equal(b.weights(resumed.model)[name], value)
    # the projections are the loss's, not the student's
    assert not set(shapes) & set(b.weights(first.model))


def test_a_trainer_refuses_loss_parameters_that_do_not_fit(backend):
    config = tiny_setup(0)[0]
    teacher_config = wide_teacher(config)
    b = get_backend(backend)
    student = b.build(config, init_weights(config, seed=0, dtype="float32"), dtype="float32")
    teacher = b.build(teacher_config, init_weights(teacher_config, seed=1, dtype="float32"), dtype="float32")
    spec = TrainSpec(loss=WIDE_SPEC)
    with pytest.raises(InputError, match="'proj.3' has shape \\[96, 96\\], not \\[96, 64\\]"):
        b.trainer(student, spec, companions={"teacher": teacher},
                  loss_parameters={"proj.3": np.zeros((96, 96), np.float32), "proj.6": np.zeros((96, 64), np.float32)})
    with pytest.raises(InputError, match="needs a projection"):
        b.trainer(student, TrainSpec(loss=LossSpec(transfer=(HiddenStateTransfer(3, 2),))), companions={"teacher": teacher})
