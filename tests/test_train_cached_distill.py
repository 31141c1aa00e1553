"""Distillation from cached sparse teacher targets (gemmalab.train.losses.CachedDistillation): the numpy term
against gemmalab.distill.sparse's estimators (the reference a colleague wrote for it) and a hand derivation,
top-k over the whole vocabulary against the online forward KL, the input checks; then every backend's
trainer against the float64 numpy reference, value, per-term sums and gradient, for top-k and sampled
targets of a random teacher, and with k = vocabulary against the online Distillation trainer run with the
same teacher as a companion: the strongest check that the cached and the online paths agree.

The oracle of a backend is ``reference.forward`` of the student in float64 under ``losses.loss_sum`` and
``losses.term_sums``; the targets come from ``sparse.top_k_targets`` / ``sparse.sampled_targets`` of the
teacher's reference logits; gradients are directional derivatives against central finite differences of that
oracle (train_oracles.check_directional_derivative)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from train_oracles import check_directional_derivative, tiny_setup

from gemmalab import reference
from gemmalab.backend import get_backend
from gemmalab.distill.sparse import (
    SparseTargets,
    sampled_cross_entropy,
    sampled_targets,
    sparse_kl,
    top_k_targets,
)
from gemmalab.errors import InputError
from gemmalab.params import init_weights
from gemmalab.train import losses
from gemmalab.train.inputs import prepare
from gemmalab.train.losses import (
    CachedDistillation,
    CrossEntropy,
    Distillation,
    LossSpec,
    cached_distillation_loss,
    distillation_loss,
)
from gemmalab.train.spec import TrainSpec

TEMPERATURE = 2.0


def as_extras(targets: SparseTargets, estimator: str = "top-k") -> dict[str, np.ndarray]:
    """The batch extras of cached targets under the default names (sampled targets carry no tail)."""
    extras = {"teacher_ids": targets.ids, "teacher_logprobs": targets.logprobs}
    if estimator == "top-k":
        extras["teacher_tail"] = targets.tail
    return extras


def sparse_targets(estimator: str, logits: np.ndarray, k: int, temperature: float = TEMPERATURE, seed: int = 0):
    if estimator == "top-k":
        return top_k_targets(logits, k, temperature)
    return sampled_targets(logits, k, temperature, np.random.default_rng(seed))


# --- the numpy term -----------------------------------------------------------------------------------------
def test_the_term_on_three_words_by_hand():
    student = np.log([[[0.5, 0.25, 0.25]]])  # q = [1/2, 1/4, 1/4] at T = 1: [batch 1, seq 1, vocab 3]
    # top-1: the teacher keeps id 0 at p = 0.8, tail 0.2; the student's rest bucket holds 1/2
    top = {"teacher_ids": np.array([[[0]]]), "teacher_logprobs": np.log([[[0.8]]]), "teacher_tail": np.array([[0.2]])}
    expected = 0.8 * np.log(0.8 / 0.5) + 0.2 * np.log(0.2 / 0.5)
    got = losses.head_term(CachedDistillation(temperature=1.0), student, None, top)
    np.testing.assert_allclose(got, [[expected]], rtol=1e-12)
    # a tail of 0 (a teacher sure of its kept ids) adds 0 log 0 = 0
    sure = {**top, "teacher_logprobs": np.zeros((1, 1, 1)), "teacher_tail": np.zeros((1, 1))}
    np.testing.assert_allclose(losses.head_term(CachedDistillation(temperature=1.0), student, None, sure),
                               [[np.log(1 / 0.5)]], rtol=1e-12)
    # sampled ids 0 and 1: -(log 1/2 + log 1/4) / 2; the log-probabilities play no part
    drawn = {"teacher_ids": np.array([[[0, 1]]]), "teacher_logprobs": np.full((1, 1, 2), -0.7)}
    term = CachedDistillation(estimator="sampled", temperature=1.0)
    np.testing.assert_allclose(losses.head_term(term, student, None, drawn), [[-(np.log(0.5) + np.log(0.25)) / 2]],
                               rtol=1e-12)
    # at T = 2 the same q comes from twice the logits, and T^2 = 4 multiplies
    hot = CachedDistillation(estimator="sampled", temperature=2.0)
    np.testing.assert_allclose(losses.head_term(hot, 2 * student, None, drawn), [[-2 * (np.log(0.5) + np.log(0.25))]],
                               rtol=1e-12)


@pytest.mark.parametrize("estimator", ["top-k", "sampled"])
def test_the_term_is_the_sparse_estimator_times_t_squared(estimator):
    rng = np.random.default_rng(3)
    student, teacher = rng.normal(0, 2, size=(2, 5, 17)), rng.normal(0, 3, size=(2, 5, 17))
    targets = sparse_targets(estimator, teacher, 4, temperature=1.5)
    estimate = sparse_kl if estimator == "top-k" else sampled_cross_entropy
    expected = estimate(student, targets, 1.5)
    extras = as_extras(targets, estimator)
    for t2_scaling, factor in ((True, 1.5**2), (False, 1.0)):
        term = CachedDistillation(estimator=estimator, temperature=1.5, t2_scaling=t2_scaling)
        np.testing.assert_allclose(losses.head_term(term, student, None, extras), factor * expected, rtol=1e-12)
    # the loss is alpha * CE + (1 - alpha) * the term, with both parts in the per-term sums
    spec = cached_distillation_loss(alpha=0.3, estimator=estimator, temperature=1.5, label_smoothing=0.1)
    hard, weights = rng.integers(0, 17, size=(2, 5)), rng.uniform(0, 1, size=(2, 5))
    sums = losses.term_sums(spec, student, hard, weights, extras)
    assert sums == {"cross_entropy": pytest.approx(float(np.sum(weights * losses.cross_entropy(student, hard, 0.1)))),
                    "cached_distillation": pytest.approx(float(np.sum(weights * 1.5**2 * expected)))}
    assert losses.loss_sum(spec, student, hard, weights, extras) == pytest.approx(
        0.3 * sums["cross_entropy"] + 0.7 * sums["cached_distillation"])


def test_top_k_with_k_equal_to_the_vocabulary_equals_the_online_loss():
    """The issue's acceptance test: the cache keeps every id, so its sparse KL is the full forward KL."""
    rng = np.random.default_rng(4)
    student, teacher = rng.normal(0, 2, size=(2, 6, 23)), rng.normal(0, 4, size=(2, 6, 23))
    for temperature in (1.0, 2.5):
        extras = as_extras(top_k_targets(teacher, 23, temperature))
        assert np.all(extras["teacher_tail"] == 0)
        cached = losses.head_term(CachedDistillation(temperature=temperature), student, None, extras)
        online = losses.head_term(Distillation(divergence="fkl", temperature=temperature), student, None, {},
                                  {"teacher": teacher})
        np.testing.assert_allclose(cached, online, rtol=1e-5, atol=1e-7)  # float32 log p from the cache
    hard, weights = rng.integers(0, 23, size=(2, 6)), rng.uniform(0, 1, size=(2, 6))
    extras = as_extras(top_k_targets(teacher, 23, TEMPERATURE))
    assert losses.loss_sum(cached_distillation_loss(0.3, temperature=TEMPERATURE), student, hard, weights, extras) == \
        pytest.approx(losses.loss_sum(distillation_loss(0.3, temperature=TEMPERATURE), student, hard, weights,
                                      companion_logits={"teacher": teacher}), rel=1e-6)


def test_cached_distillation_loss_builds_both_terms():
    spec = cached_distillation_loss(alpha=0.3, estimator="sampled", temperature=3.0, label_smoothing=0.1,
                                    t2_scaling=False)
    ce, kd = spec.head
    assert ce == CrossEntropy(label_smoothing=0.1, weight=0.3)
    assert kd == CachedDistillation(estimator="sampled", temperature=3.0, t2_scaling=False, weight=kd.weight)
    assert kd.weight == pytest.approx(0.7)
    assert spec.term_names() == ("cross_entropy", "cached_distillation")
    assert spec.extras == ("teacher_ids", "teacher_logprobs")  # sampled targets have no tail
    assert cached_distillation_loss().extras == ("teacher_ids", "teacher_logprobs", "teacher_tail")
    assert not spec.companions and not spec.scalars and not spec.plain_cross_entropy
    assert [t.weight for t in cached_distillation_loss(alpha=1.0).head] == [1.0, 0.0]  # both parts kept


def test_bad_terms_raise_one_line_errors():
    for kwargs, match in (({"estimator": "top_k"}, "top-k, sampled"), ({"temperature": 0.0}, "temperature"),
                          ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
                          ({"weight": -1.0}, "weight"), ({"logprobs": "teacher_ids"}, "distinct names"),
                          ({"tail": ""}, "distinct names")):
        with pytest.raises(InputError, match=match):
            CachedDistillation(**kwargs)
    CachedDistillation(estimator="sampled", tail="teacher_ids")  # the sampled estimator reads no tail
    with pytest.raises(InputError, match="alpha"):
        cached_distillation_loss(alpha=-0.1)
    with pytest.raises(InputError, match="estimator"):
        cached_distillation_loss(estimator="exact")


def test_prepare_checks_the_cached_targets():
    config, _, inputs, targets, loss_weights = tiny_setup(0)
    logits = np.random.default_rng(5).normal(0, 3, size=inputs.shape + (config.vocab_size,))
    good = as_extras(top_k_targets(logits, 5))
    spec = cached_distillation_loss()

    def check(extras, loss=spec):
        return prepare(config, loss, inputs, targets, loss_weights, extras=extras).extras

    wide = {**good, "teacher_ids": good["teacher_ids"].astype(np.int64),
            "teacher_logprobs": good["teacher_logprobs"].astype(np.float64)}
    got = check({**wide, "teacher_tail": np.where(np.arange(20) == 3, -1e-7, good["teacher_tail"])})
    assert [got[name].dtype for name in spec.extras] == [np.int32, np.float32, np.float32]
    assert [got[name].shape for name in spec.extras] == [(2, 20, 5), (2, 20, 5), (2, 20)]
    np.testing.assert_array_equal(got["teacher_ids"], good["teacher_ids"])
    assert got["teacher_tail"][:, 3].tolist() == [0.0, 0.0]  # float32 rounding below 0 is clipped to 0

    ids, logprobs, tail = good["teacher_ids"], good["teacher_logprobs"], good["teacher_tail"]
    repeated = ids.copy()
    repeated[1, 7, 4] = repeated[1, 7, 0]
    for changes, match in (
        ({"teacher_ids": ids.astype(np.float32)}, "'teacher_ids' \\(teacher ids\\) must be integers"),
        ({"teacher_ids": ids[..., 0]}, "has shape \\[2, 20\\], not \\[2, 20, k\\]"),
        ({"teacher_ids": ids[:, :-1]}, "not \\[2, 20, k\\]"),
        ({"teacher_ids": np.where(ids == ids[0, 0, 0], config.vocab_size, ids)},
         f"id {config.vocab_size}, outside the student's vocabulary of {config.vocab_size}"),
        ({"teacher_ids": np.where(ids == ids[0, 0, 0], -1, ids)}, "id -1, outside"),
        ({"teacher_ids": repeated}, "repeats an id within a position"),
        ({"teacher_logprobs": logprobs[..., :4]}, "shape \\[2, 20, 4\\], not the \\[2, 20, 5\\] of its ids"),
        ({"teacher_logprobs": logprobs + 0.5}, "above 0"),
        ({"teacher_logprobs": np.where(logprobs == logprobs[0, 0, 0], -np.inf, logprobs)}, "NaN or infinite"),
        ({"teacher_logprobs": logprobs.astype(str)}, "must be numbers"),
        ({"teacher_tail": tail[None]}, "has shape \\[1, 2, 20\\], not \\[2, 20\\]"),
        ({"teacher_tail": tail * np.nan}, "estimator='sampled'"),
        ({"teacher_tail": tail + 1.0}, "outside \\[0, 1\\]"),
        ({"teacher_tail": tail - 2e-6 - tail.max()}, "outside \\[0, 1\\]"),
    ):
        with pytest.raises(InputError, match=match):
            check({**good, **changes})
    with pytest.raises(InputError, match="does not carry"):
        check({"teacher_ids": ids, "teacher_logprobs": logprobs})
    # sampled targets: ids may repeat, and the NaN tail is not an input of the term at all
    sampled = as_extras(sampled_targets(logits, 5, 1.0, np.random.default_rng(0)), "sampled")
    assert check({**sampled, "teacher_ids": repeated}, cached_distillation_loss(estimator="sampled"))
    with pytest.raises(InputError, match="'teacher_tail', which no loss term reads"):
        check({**sampled, "teacher_tail": np.full((2, 20), np.nan)}, cached_distillation_loss(estimator="sampled"))
    # two terms may not read one name in different roles
    crossed = LossSpec(head=(CachedDistillation(), CachedDistillation(ids="teacher_logprobs", logprobs="teacher_ids",
                                                                      estimator="sampled")))
    with pytest.raises(InputError, match="read as teacher log-probabilities and as teacher ids"):
        check(good, crossed)


# --- every backend against the reference ----------------------------------------------------------------------
SOFTCAP = {"tie_word_embeddings": False, "final_logit_softcapping": 3.0}  # the untied-softcap shape of conftest
STUDENTS = {"tiny": {}, "untied-softcap": SOFTCAP}
# A random student spreads its mass almost evenly over the vocabulary (1.9% on any 5 ids), and then the rest
# bucket's part of the sparse KL's gradient (about r * q_kept) is 1% of it, below what a finite-difference
# check resolves. So the student's output matrix is scaled (a confident student), and the cached teacher is
# the sum of its own logits and another model's (a teacher the student already partly agrees with): the
# tiny student then holds about 70% of its mass on the teacher's top 5, the teacher 77%, and the rest bucket
# makes about half of the distillation gradient.
STUDENT_SHARPEN = 20.0
TEACHER_SHARPEN = 20.0
CHUNK = 7  # 40 positions: 6 chunks, the last one partial


def student_setup(student: str):
    """tiny_setup(0) (2 x 20 positions, a few of weight 0) with the head of ``student``, its output matrix
    (the embedding, when tied) scaled by STUDENT_SHARPEN."""
    config, weights, *batch = tiny_setup(0, **STUDENTS[student])
    matrix = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    return config, {**weights, matrix: weights[matrix] * STUDENT_SHARPEN}, *batch


def teacher_setup(config):
    """(config, float32 weights) of a teacher unlike the student but over the same vocabulary (the online
    comparison needs every id): hidden 96, 2 layers, window 6, its own untied head, scaled by TEACHER_SHARPEN."""
    teacher = dataclasses.replace(config, hidden_size=96, num_hidden_layers=2, sliding_window=6,
                                  layer_types=("sliding_attention", "full_attention"), tie_word_embeddings=False,
                                  final_logit_softcapping=None, name="teacher")
    weights = init_weights(teacher, seed=10, dtype="float32")
    weights["lm_head.weight"] = weights["lm_head.weight"] * TEACHER_SHARPEN
    return teacher, weights


def cached_teacher_logits(config, weights, inputs) -> np.ndarray:
    """What the cache of the k = 5 tests is built from, float64: the teacher model's reference logits plus the
    student's own (any logits array is a teacher to the cached term)."""
    return reference.forward(*teacher_setup(config), inputs) + reference.forward(config, weights, inputs)


def oracle_sums(spec, config, weights, batch, extras):
    """(loss sum, term sums) of the float64 reference student against the cached targets."""
    inputs, targets, loss_weights = batch
    logits = reference.forward(config, weights, inputs)
    return (losses.loss_sum(spec, logits, targets, loss_weights, extras),
            losses.term_sums(spec, logits, targets, loss_weights, extras))


def assert_term_sums(got: dict[str, float], expected: dict[str, float], rel: float) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=rel), name


_CROSS_ENTROPY_GRADIENTS: dict[tuple[str, str], dict[str, np.ndarray]] = {}
SMOOTHED = LossSpec(head=(CrossEntropy(label_smoothing=0.1),))


def cross_entropy_gradients(backend: str, student: str) -> dict[str, np.ndarray]:
    """The gradients of the smoothed cross-entropy alone, once per backend and student (a JAX trainer
    compiles): the part of a distillation loss's gradient that is not the teacher's."""
    if (backend, student) not in _CROSS_ENTROPY_GRADIENTS:
        config, weights, inputs, targets, loss_weights = student_setup(student)
        b = get_backend(backend)
        trainer = b.trainer(b.build(config, weights, dtype="float32"), TrainSpec(loss=SMOOTHED, loss_chunk_tokens=CHUNK))
        trainer.accumulate(inputs, targets, loss_weights)
        _CROSS_ENTROPY_GRADIENTS[backend, student] = trainer.gradients()
    return _CROSS_ENTROPY_GRADIENTS[backend, student]


def distillation_part(backend: str, student: str, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The whole gradient of ``0.3 * CE + 0.7 * KD`` less 0.3 times the cross-entropy's alone: the gradient of
    0.7 times the distillation term. Along a random direction the cross-entropy's gradient can dwarf the
    teacher's, so a broken distillation gradient could hide behind it in a check of the whole."""
    ce = cross_entropy_gradients(backend, student)
    return {name: grads[name].astype(np.float64) - 0.3 * ce[name] for name in grads}


@pytest.mark.parametrize(("estimator", "student"), [("top-k", "tiny"), ("sampled", "untied-softcap")])
def test_cached_targets_train_against_the_reference(backend, estimator, student):
    config, weights, inputs, targets, loss_weights = student_setup(student)
    extras = as_extras(sparse_targets(estimator, cached_teacher_logits(config, weights, inputs), k=5), estimator)
    if estimator == "top-k":
        extras["teacher_tail"][1, 4] = 0.0  # a teacher sure of its top 5 here: the rest term is 0 log 0 = 0
    spec = cached_distillation_loss(alpha=0.3, estimator=estimator, temperature=TEMPERATURE, label_smoothing=0.1)
    b = get_backend(backend)
    trainer = b.trainer(b.build(config, weights, dtype="float32"), TrainSpec(loss=spec, loss_chunk_tokens=CHUNK))
    got = trainer.accumulate(inputs, targets, loss_weights, extras=extras)

    batch = (inputs, targets, loss_weights)
    expected, sums = oracle_sums(spec, config, weights, batch, extras)
    assert got == pytest.approx(expected, rel=1e-5)
    assert 0.7 * sums["cached_distillation"] > 0.3 * expected  # the teacher's part counts
    assert_term_sums(trainer.term_sums(), sums, rel=1e-4)
    grads = trainer.gradients()
    check_directional_derivative(grads, lambda w: oracle_sums(spec, config, w, batch, extras)[0], weights, list(weights))
    kd_only = cached_distillation_loss(alpha=0.0, estimator=estimator, temperature=TEMPERATURE)
    check_directional_derivative(
        distillation_part(backend, student, grads), lambda w: 0.7 * oracle_sums(kd_only, config, w, batch, extras)[0],
        weights, list(weights), seed=1,
    )


def test_top_k_over_the_whole_vocabulary_trains_like_the_online_teacher(backend):
    """k = vocabulary: the cached trainer and the online one (the same teacher built on the backend as a
    companion) compute the oracle's loss and per-term sums, and one gradient, whose distillation part is the
    oracle's too."""
    student = "untied-softcap"
    config, weights, inputs, targets, loss_weights = student_setup(student)
    teacher_config, teacher_weights = teacher_setup(config)
    extras = as_extras(top_k_targets(reference.forward(teacher_config, teacher_weights, inputs), config.vocab_size,
                                     TEMPERATURE))
    cached_spec = cached_distillation_loss(alpha=0.3, temperature=TEMPERATURE, label_smoothing=0.1)
    online_spec = distillation_loss(alpha=0.3, temperature=TEMPERATURE, divergence="fkl", label_smoothing=0.1)
    b = get_backend(backend)
    spec = TrainSpec(loss=cached_spec, loss_chunk_tokens=CHUNK)
    cached = b.trainer(b.build(config, weights, dtype="float32"), spec)
    online = b.trainer(b.build(config, weights, dtype="float32"), dataclasses.replace(spec, loss=online_spec),
                       companions={"teacher": b.build(teacher_config, teacher_weights, dtype="float32")})
    got = cached.accumulate(inputs, targets, loss_weights, extras=extras)
    got_online = online.accumulate(inputs, targets, loss_weights)

    batch = (inputs, targets, loss_weights)
    expected, sums = oracle_sums(cached_spec, config, weights, batch, extras)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got_online == pytest.approx(got, rel=1e-5)
    assert_term_sums(cached.term_sums(), sums, rel=1e-4)
    online_sums = online.term_sums()
    assert online_sums["distillation"] == pytest.approx(cached.term_sums()["cached_distillation"], rel=1e-4)
    assert online_sums["cross_entropy"] == pytest.approx(cached.term_sums()["cross_entropy"], rel=1e-5)
    # the teacher's parts of the two gradients agree, each measured against its own size
    grads, grads_online = cached.gradients(), online.gradients()
    assert grads.keys() == grads_online.keys() == weights.keys()
    part, part_online = distillation_part(backend, student, grads), distillation_part(backend, student, grads_online)
    for name in weights:
        scale = np.max(np.abs(part_online[name]))
        assert np.max(np.abs(part[name] - part_online[name])) <= 1e-4 * scale, name
    kd_only = cached_distillation_loss(alpha=0.0, temperature=TEMPERATURE)
    check_directional_derivative(part, lambda w: 0.7 * oracle_sums(kd_only, config, w, batch, extras)[0], weights,
                                 list(weights))
