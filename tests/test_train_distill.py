"""Knowledge distillation from a frozen companion model (gemmalab.train.losses.Distillation): the numpy
divergences against hand derivations and against TRL's ``generalized_jsd_loss``, the restriction to the
shared vocabulary, the temperature schedule and the input checks; then every backend's trainer, with a
teacher of another config (wider, 64 more ids, fewer layers, another sliding window, soft-capped or tied),
against the float64 numpy reference: the loss, its per-term sums and its gradient, a scheduled temperature
on a packed batch (compiled once on JAX), the teacher frozen through training steps, and a bf16 teacher.

The oracle of a backend is ``reference.forward`` of both models in float64 under ``losses.loss_sum`` with
the teacher's logits as ``companion_logits``; gradients are directional derivatives against central finite
differences of that oracle (train_oracles.check_directional_derivative)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
from train_oracles import check_directional_derivative, tiny_setup

from gemmalab import reference
from gemmalab.backend import get_backend
from gemmalab.errors import InputError
from gemmalab.params import init_weights
from gemmalab.train import losses
from gemmalab.train.inputs import prepare
from gemmalab.train.losses import CrossEntropy, Distillation, HiddenStateMSE, LossSpec, distillation_loss
from gemmalab.train.schedules import ValueSchedule
from gemmalab.train.spec import TrainSpec, check_companions

# p_s = [1/4, 3/4] and p_t = [1/2, 1/2] at temperature 1 (and at T = 2 from twice these logits)
STUDENT = np.array([[0.0, np.log(3.0)]])
TEACHER = np.array([[0.0, 0.0]])


def by_hand_kl(p, q) -> float:
    return float(sum(a * np.log(a / b) for a, b in zip(p, q, strict=True)))


# --- the numpy formulas, by hand ----------------------------------------------------------------------------
def test_each_divergence_by_hand():
    p_s, p_t = [0.25, 0.75], [0.5, 0.5]
    expected = {
        "fkl": 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75),  # KL(p_t || p_s)
        "rkl": 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5),  # KL(p_s || p_t)
        "tvd": 0.5 * (0.25 + 0.25),
    }
    # jsd at beta = 0.3: m = 0.7 p_s + 0.3 p_t = [0.325, 0.675]; 0.3 KL(p_t || m) + 0.7 KL(p_s || m)
    m = [0.7 * 0.25 + 0.3 * 0.5, 0.7 * 0.75 + 0.3 * 0.5]
    expected["jsd"] = 0.3 * by_hand_kl(p_t, m) + 0.7 * by_hand_kl(p_s, m)
    for kind, value in expected.items():
        got = losses.divergence(STUDENT, TEACHER, kind, beta=0.3, t2_scaling=False)
        assert got[0] == pytest.approx(value, rel=1e-12), kind
        # at T = 2 the same distributions come from twice the logits, and T^2 = 4 multiplies
        hot = losses.divergence(2 * STUDENT, 2 * TEACHER, kind, beta=0.3, temperature=2.0)
        assert hot[0] == pytest.approx(4 * value, rel=1e-12), kind
    assert expected["jsd"] > 0 and expected["fkl"] != pytest.approx(expected["rkl"])


def test_jsd_at_beta_0_is_forward_kl_and_at_beta_1_reverse_kl():
    rng = np.random.default_rng(0)
    z_s, z_t = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
    for beta, kind in ((0.0, "fkl"), (1.0, "rkl")):
        np.testing.assert_allclose(losses.divergence(z_s, z_t, "jsd", beta=beta, temperature=1.5),
                                   losses.divergence(z_s, z_t, kind, temperature=1.5), rtol=1e-12)


def trl_generalized_jsd():
    """TRL's GKDTrainer.generalized_jsd_loss (the oracle of the jsd convention), wherever this TRL keeps it."""
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL warns on importing trl.experimental
        try:
            from trl.experimental.gkd import GKDTrainer
        except ImportError:  # TRL before the GKD trainer moved to trl.experimental
            from trl import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_divergence_equals_trl_generalized_jsd(beta):
    torch = pytest.importorskip("torch")
    trl_loss = trl_generalized_jsd()
    rng = np.random.default_rng(1)
    z_s, z_t = rng.normal(0, 2, size=(2, 5, 11)), rng.normal(0, 2, size=(2, 5, 11))
    per_entry = trl_loss(torch.tensor(z_s), torch.tensor(z_t), beta=beta, temperature=2.0, reduction="none")
    expected = per_entry.sum(-1).numpy()  # per token: TRL's "none" keeps the vocabulary axis
    got = losses.divergence(z_s, z_t, "jsd", beta=beta, temperature=2.0, t2_scaling=False)  # TRL has no T^2
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    scaled = losses.divergence(z_s, z_t, "jsd", beta=beta, temperature=2.0)
    np.testing.assert_allclose(scaled, 4 * expected, rtol=1e-10)


def test_restriction_renormalises_over_the_shared_ids():
    assert losses.shared_vocab(262144, 262208) == losses.shared_vocab(262208, 262144) == 262144
    # a teacher of 3 ids at [1/8, 3/8, 1/2]: over the 2 shared ids it is [1/4, 3/4]
    teacher = np.array([[0.0, np.log(3.0), np.log(4.0)]])
    restricted = losses.restrict(teacher, losses.shared_vocab(2, 3))
    np.testing.assert_allclose(np.exp(losses.log_softmax(restricted)), [[0.25, 0.75]], rtol=1e-12)
    # so a 2-id student at [1/4, 3/4] has nothing left to learn from it: every divergence is 0
    spec = LossSpec(head=(Distillation(divergence="fkl", temperature=1.0),))
    student = STUDENT[None]  # [batch 1, seq 1, vocab 2]
    sums = losses.term_sums(spec, student, np.zeros((1, 1), int), np.ones((1, 1)),
                            companion_logits={"teacher": teacher[None]})
    assert sums == {"distillation": pytest.approx(0.0, abs=1e-12)}
    # a student with more ids than its teacher is restricted too: its extra id leaves the KD term
    wide = np.array([[[0.0, np.log(3.0), 5.0]]])
    np.testing.assert_allclose(losses.head_term(spec.head[0], wide, None, {}, {"teacher": STUDENT[None]}), [[0.0]],
                               atol=1e-12)


def test_value_schedule_by_hand():
    linear, cosine = ValueSchedule("linear", 4.0, 1.0, 10), ValueSchedule("cosine", 4.0, 1.0, 10)
    assert [linear(s) for s in (0, 5, 10, 12)] == pytest.approx([4.0, 2.5, 1.0, 1.0])
    # end + (start - end) * (1 + cos(pi * step / total)) / 2: 4, 1 + 3 * (1 + cos(pi / 2)) / 2 = 2.5, 1
    assert [cosine(s) for s in (0, 5, 10)] == pytest.approx([4.0, 2.5, 1.0])
    assert cosine(2) == pytest.approx(1.0 + 3.0 * (1.0 + math.cos(math.pi * 0.2)) / 2)
    assert [ValueSchedule("constant", 2.0, 9.0, 3)(s) for s in (0, 3)] == [2.0, 2.0]


def test_distillation_loss_builds_both_terms():
    spec = distillation_loss(alpha=0.3, temperature=3.0, divergence="jsd", beta=0.2, label_smoothing=0.1,
                             temperature_input="temperature")
    ce, kd = spec.head
    assert ce == CrossEntropy(label_smoothing=0.1, weight=0.3)
    assert kd.weight == pytest.approx(0.7)
    assert kd == Distillation(divergence="jsd", beta=0.2, temperature=3.0, teacher="teacher",
                              temperature_input="temperature", weight=kd.weight)
    assert spec.term_names() == ("cross_entropy", "distillation")
    assert spec.companions == ("teacher",) and spec.scalars == ("temperature",) and not spec.plain_cross_entropy
    # alpha 1 keeps the distillation term, at weight 0, so metrics always show both parts
    assert [t.weight for t in distillation_loss(alpha=1.0).head] == [1.0, 0.0]
    # loss_sum is each term's sum times its weight
    rng = np.random.default_rng(2)
    logits, teacher = rng.normal(size=(1, 3, 5)), rng.normal(size=(1, 3, 6))
    targets, weights = np.array([[0, 4, 2]]), np.array([[1.0, 0.5, 0.0]])
    sums = losses.term_sums(spec, logits, targets, weights, companion_logits={"teacher": teacher},
                            scalars={"temperature": 1.5})
    assert sums["cross_entropy"] == pytest.approx(float(np.sum(weights * losses.cross_entropy(logits, targets, 0.1))))
    assert losses.loss_sum(spec, logits, targets, weights, companion_logits={"teacher": teacher},
                           scalars={"temperature": 1.5}) == pytest.approx(0.3 * sums["cross_entropy"] + 0.7 * sums["distillation"])


def test_term_names_are_unique():
    spec = LossSpec(head=(CrossEntropy(), Distillation(), Distillation(teacher="other"), CrossEntropy()),
                    aux=(HiddenStateMSE(3, "a"), HiddenStateMSE(3, "b"), HiddenStateMSE(4, "c")))
    assert spec.term_names() == ("cross_entropy", "distillation", "distillation_2", "cross_entropy_2",
                                 "hidden_mse_3", "hidden_mse_3_2", "hidden_mse_4")
    assert spec.companions == ("teacher", "other")


def test_bad_terms_schedules_and_step_inputs_raise_one_line_errors():
    for kwargs, match in (({"divergence": "kl"}, "fkl, rkl, jsd, tvd"), ({"beta": 1.5}, "beta"),
                          ({"temperature": 0.0}, "temperature"), ({"temperature": float("inf")}, "temperature"),
                          ({"weight": -1.0}, "weight")):
        with pytest.raises(InputError, match=match):
            Distillation(**kwargs)
    with pytest.raises(InputError, match="alpha"):
        distillation_loss(alpha=1.5)
    with pytest.raises(InputError, match="value schedule 'exp'"):
        ValueSchedule("exp", 1.0, 2.0, 10)
    with pytest.raises(InputError, match="total >= 1"):
        ValueSchedule("linear", 1.0, 2.0, 0)

    config, _, inputs, targets, loss_weights = tiny_setup(0)
    spec = distillation_loss(temperature_input="temperature")
    assert prepare(config, spec, inputs, targets, loss_weights, scalars={"temperature": 3}).scalars == {"temperature": 3.0}
    for scalars, match in (({}, "does not pass"), ({"temperature": 2.0, "other": 1.0}, "no loss term reads"),
                           ({"temperature": float("nan")}, "finite"), ({"temperature": 0.0}, "> 0")):
        with pytest.raises(InputError, match=match):
            prepare(config, spec, inputs, targets, loss_weights, scalars=scalars)
    with pytest.raises(InputError, match="no loss term reads"):
        prepare(config, LossSpec(), inputs, targets, loss_weights, scalars={"temperature": 2.0})
    narrow = dataclasses.replace(config, vocab_size=int(inputs.max()))  # a teacher that cannot embed every id
    with pytest.raises(InputError, match="vocabulary of the companion model 'teacher'"):
        prepare(config, spec, inputs, targets, loss_weights, scalars={"temperature": 2.0}, companions={"teacher": narrow})

    with pytest.raises(InputError, match="was not given"):
        check_companions(spec, config, {})
    with pytest.raises(InputError, match="no loss term reads"):
        check_companions(spec, config, {"teacher": config, "spare": config})
    with pytest.raises(InputError, match="not given"):
        check_companions(distillation_loss(teacher="big"), config, {"teacher": config})


# --- every backend against the reference ----------------------------------------------------------------------
# The teacher's head is sharpened (its matrix scaled) so that its distribution is far from the random
# student's: the distillation term is then a large part of the loss and of its gradient, which the checks need.
SHARPEN = 20.0
TEACHER_HEADS = {"softcap": {"tie_word_embeddings": False, "final_logit_softcapping": 5.0}, "tied": {}}


def teacher_setup(config, head: str = "softcap", seed: int = 10):
    """(config, float32 weights) of a teacher unlike the student: hidden 96 (not 64), 64 more ids (the
    262144/262208 difference, scaled down), 2 layers with a window of 6 (not 8), and the head of ``head``."""
    teacher = dataclasses.replace(config, vocab_size=config.vocab_size + 64, hidden_size=96, num_hidden_layers=2,
                                  layer_types=("sliding_attention", "full_attention"), sliding_window=6,
                                  name="teacher", **TEACHER_HEADS[head])
    weights = init_weights(teacher, seed=seed, dtype="float32")
    matrix = "model.embed_tokens.weight" if teacher.tie_word_embeddings else "lm_head.weight"
    weights[matrix] = weights[matrix] * SHARPEN
    return teacher, weights


def oracle_sums(spec, config, weights, batch, teacher_logits, scalars=None, positions=None, mask=None):
    """(loss sum, term sums) of the float64 reference student against the teacher's reference logits."""
    inputs, targets, loss_weights = batch
    logits = reference.forward(config, weights, inputs, positions=positions, mask=mask)
    kwargs = {"companion_logits": {"teacher": teacher_logits}, "scalars": scalars}
    return (losses.loss_sum(spec, logits, targets, loss_weights, **kwargs),
            losses.term_sums(spec, logits, targets, loss_weights, **kwargs))


def assert_term_sums(got: dict[str, float], expected: dict[str, float], rel: float) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=rel), name


_CROSS_ENTROPY_GRADIENTS: dict[str, dict[str, np.ndarray]] = {}
SMOOTHED = LossSpec(head=(CrossEntropy(label_smoothing=0.1),))


def cross_entropy_gradients(backend: str) -> dict[str, np.ndarray]:
    """The gradients of the smoothed cross-entropy alone on tiny_setup(0), once per backend (a JAX trainer
    compiles): the part of a distillation loss's gradient that is not the teacher's."""
    if backend not in _CROSS_ENTROPY_GRADIENTS:
        config, weights, inputs, targets, loss_weights = tiny_setup(0)
        b = get_backend(backend)
        trainer = b.trainer(b.build(config, weights, dtype="float32"), TrainSpec(loss=SMOOTHED, loss_chunk_tokens=7))
        trainer.accumulate(inputs, targets, loss_weights)
        _CROSS_ENTROPY_GRADIENTS[backend] = trainer.gradients()
    return _CROSS_ENTROPY_GRADIENTS[backend]


@pytest.mark.parametrize(("divergence", "head"), [("fkl", "softcap"), ("rkl", "tied"), ("jsd", "softcap"),
                                                  ("tvd", "tied")])
def test_each_divergence_trains_against_the_reference(backend, divergence, head):
    config, weights, inputs, targets, loss_weights = tiny_setup(0)
    teacher_config, teacher_weights = teacher_setup(config, head)
    # beta 0.3: at 0.5 the mixture is symmetric, and a student and teacher swapped would go unseen
    spec = distillation_loss(alpha=0.3, temperature=2.0, divergence=divergence, beta=0.3, label_smoothing=0.1)
    b = get_backend(backend)
    teacher = b.build(teacher_config, teacher_weights, dtype="float32")
    trainer = b.trainer(b.build(config, weights, dtype="float32"), TrainSpec(loss=spec, loss_chunk_tokens=7),
                        companions={"teacher": teacher})  # 40 positions: 6 chunks, the last one partial
    got = trainer.accumulate(inputs, targets, loss_weights)

    batch = (inputs, targets, loss_weights)
    teacher_logits = reference.forward(teacher_config, teacher_weights, inputs)
    expected, sums = oracle_sums(spec, config, weights, batch, teacher_logits)
    assert got == pytest.approx(expected, rel=1e-5)
    assert 0.7 * sums["distillation"] > 0.1 * expected  # the teacher's part counts
    assert_term_sums(trainer.term_sums(), sums, rel=1e-4)
    grads = trainer.gradients()
    check_directional_derivative(grads, lambda w: oracle_sums(spec, config, w, batch, teacher_logits)[0],
                                 weights, list(weights))
    # Along a random direction the cross-entropy's gradient dwarfs the teacher's (tvd's is 0.1% of it), so the
    # teacher's part is checked on its own: the whole gradient less 0.3 times the cross-entropy's alone is the
    # gradient of 0.7 times the distillation term.
    ce = cross_entropy_gradients(backend)
    teacher_part = {name: grads[name].astype(np.float64) - 0.3 * ce[name] for name in weights}
    kd_only = distillation_loss(alpha=0.0, temperature=2.0, divergence=divergence, beta=0.3)
    check_directional_derivative(
        teacher_part, lambda w: 0.7 * oracle_sums(kd_only, config, w, batch, teacher_logits)[0], weights, list(weights),
        seed=1,
    )


def packed_layout(lengths: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(positions, mask) of documents packed into one row: positions restart per document, and each token
    attends causally within its own document only."""
    document = np.repeat(np.arange(len(lengths)), lengths)
    positions = np.concatenate([np.arange(n) for n in lengths])
    mask = (document[:, None] == document[None, :]) & (positions[None, :] <= positions[:, None])
    return positions, mask


def count_jax_traces(monkeypatch) -> list[int]:
    """A counter of how often JAX traces the trainer's loss (chunked_term_sums runs only while tracing)."""
    from gemmalab_jax import training

    traces = [0]
    original = training.chunked_term_sums

    def counted(*args, **kwargs):
        traces[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "chunked_term_sums", counted)
    return traces


def teacher_is_frozen(backend: str, teacher) -> bool:
    """No gradient can reach the native teacher (JAX arrays have no such state: its parameters are never a
    differentiated argument, and the bit-identical weights show that nothing updated them)."""
    if backend == "torch":
        return all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    if backend == "mlx":
        from mlx.utils import tree_flatten

        return not tree_flatten(teacher.trainable_parameters())
    return True


def test_a_scheduled_temperature_trains_a_packed_batch_and_the_teacher_stays_frozen(backend, monkeypatch):
    config, weights, inputs, targets, loss_weights = tiny_setup(3)
    teacher_config, teacher_weights = teacher_setup(config, "softcap", seed=11)
    positions, mask = packed_layout((12, 8))  # the teacher's window (6) masks differently from the student's (8)
    spec = distillation_loss(alpha=0.3, divergence="fkl", temperature_input="temperature")
    schedule = ValueSchedule("linear", 4.0, 1.0, total=2)  # 4, 2.5, 1
    traces = count_jax_traces(monkeypatch) if backend == "jax" else None
    b = get_backend(backend)
    teacher = b.build(teacher_config, teacher_weights, dtype="float32")
    before = b.weights(teacher)
    trainer = b.trainer(b.build(config, weights, dtype="float32"), TrainSpec(loss=spec, loss_chunk_tokens=16),
                        companions={"teacher": teacher})
    teacher_logits = reference.forward(teacher_config, teacher_weights, inputs, positions=positions, mask=mask)
    shapes = {name: value.shape for name, value in weights.items()}  # the teacher's (96 wide) all differ
    distilled = []
    for step in range(3):
        scalars = {"temperature": schedule(step)}
        current = {k: np.array(v) for k, v in b.weights(trainer.model).items()}
        got = trainer.accumulate(inputs, targets, loss_weights, positions=positions, mask=mask, scalars=scalars)
        expected, sums = oracle_sums(spec, config, current, (inputs, targets, loss_weights), teacher_logits, scalars,
                                     positions, mask)
        assert got == pytest.approx(expected, rel=1e-5), scalars
        assert_term_sums(trainer.term_sums(), sums, rel=1e-4)
        distilled.append(sums["distillation"])
        assert {n: g.shape for n, g in trainer.gradients().items()} == shapes
        trainer.apply(1e-2, float(loss_weights.sum()))
    assert len(set(distilled)) == 3  # each temperature gave its own distillation term
    after = b.weights(teacher)
    assert after.keys() == before.keys() and all(np.array_equal(after[n], before[n]) for n in before)
    assert teacher_is_frozen(backend, teacher)
    assert {n: v.shape for n, v in b.weights(trainer.model).items()} == shapes
    state = trainer.optimizer_state()
    assert {key.partition("/")[2] for key in state} == set(weights)
    assert all(value.shape in ((1,), shapes[key.partition("/")[2]]) for key, value in state.items())
    if traces is not None:
        assert traces[0] == 1  # three temperatures, one compiled step: the scalar is traced, not static


def test_a_bf16_teacher_distils_into_a_float32_student(backend):
    config, weights, inputs, targets, loss_weights = tiny_setup(4)
    teacher_config, teacher_weights = teacher_setup(config, "softcap", seed=12)
    spec = distillation_loss(alpha=0.3, divergence="rkl")
    b = get_backend(backend)
    teacher = b.build(teacher_config, teacher_weights, dtype="bfloat16")
    trainer = b.trainer(b.build(config, weights, dtype="float32"), TrainSpec(loss=spec, loss_chunk_tokens=16),
                        companions={"teacher": teacher})
    got = trainer.accumulate(inputs, targets, loss_weights)
    # the oracle's teacher holds the bf16 weights (computed in float64): what is left is bf16 arithmetic
    rounded = {k: np.asarray(v, np.float64) for k, v in b.weights(teacher).items()}
    teacher_logits = reference.forward(teacher_config, rounded, inputs)
    expected, sums = oracle_sums(spec, config, weights, (inputs, targets, loss_weights), teacher_logits)
    assert got == pytest.approx(expected, rel=1e-2)
    assert trainer.term_sums()["distillation"] == pytest.approx(sums["distillation"], rel=3e-2)
    assert trainer.term_sums()["cross_entropy"] == pytest.approx(sums["cross_entropy"], rel=1e-5)
    assert all(np.isfinite(g).all() for g in trainer.gradients().values())


def test_a_trainer_refuses_companions_that_do_not_fit(backend):
    config, weights, *_ = tiny_setup(0)
    teacher_config, teacher_weights = teacher_setup(config)
    b = get_backend(backend)
    student = b.build(config, weights, dtype="float32")
    teacher = b.build(teacher_config, teacher_weights, dtype="float32")
    spec = TrainSpec(loss=distillation_loss())
    with pytest.raises(InputError, match="was not given"):
        b.trainer(student, spec)
    with pytest.raises(InputError, match="no loss term reads"):
        b.trainer(student, TrainSpec(), companions={"teacher": teacher})
    with pytest.raises(InputError, match="the model being trained"):
        b.trainer(student, spec, companions={"teacher": student})
    with pytest.raises(InputError, match="not a model of this backend"):
        b.trainer(student, spec, companions={"teacher": teacher_weights})
