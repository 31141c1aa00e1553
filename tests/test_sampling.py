"""Samplers on hand-made logits: what each filter keeps, the renormalised probabilities, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from gemmalab.errors import InputError
from gemmalab.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filtered_logits,
    make_sampler,
    min_p_filter,
    softmax,
    top_k_filter,
    top_p_filter,
)

PROBS = np.array([[0.5, 0.2, 0.15, 0.1, 0.05]])
LOGITS = np.log(PROBS).astype(np.float32)


def kept_probs(logits):
    return softmax(logits.astype(np.float64))


def test_top_k_keeps_the_k_largest_and_renormalises():
    np.testing.assert_allclose(kept_probs(top_k_filter(LOGITS, 2)), [[0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(top_k_filter(LOGITS, 0), LOGITS)  # 0 = off


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.5, [1.0, 0, 0, 0, 0]),  # the top token alone reaches 0.5
        (0.7, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]),  # 0.5 + 0.2 reaches 0.7 exactly: two tokens
        (0.71, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]),  # needs the third
        (0.01, [1.0, 0, 0, 0, 0]),  # the most likely token is always kept
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    np.testing.assert_allclose(kept_probs(top_p_filter(LOGITS, p)), [expected], rtol=1e-5, atol=1e-7)


def test_top_p_works_whatever_the_order_of_the_vocabulary():
    shuffled = LOGITS[:, [3, 0, 4, 2, 1]]  # probabilities 0.1, 0.5, 0.05, 0.15, 0.2
    np.testing.assert_allclose(kept_probs(top_p_filter(shuffled, 0.7)), [[0, 0.5 / 0.7, 0, 0, 0.2 / 0.7]], rtol=1e-5, atol=1e-7)


def test_min_p_keeps_tokens_above_a_fraction_of_the_top():
    # threshold 0.29 x 0.5 = 0.145: keeps 0.5, 0.2 and 0.15
    np.testing.assert_allclose(kept_probs(min_p_filter(LOGITS, 0.29)), [[0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]], rtol=1e-5)


def test_temperature_applies_before_top_p():
    # temperature 2 flattens [0.5, 0.2, 0.15, 0.1, 0.05] to sqrt-proportional probabilities
    flat = np.sqrt(PROBS) / np.sqrt(PROBS).sum()
    assert flat[0, 0] + flat[0, 1] < 0.7 < flat[0, :3].sum()  # so top-p 0.7 now keeps three tokens
    out = filtered_logits(LOGITS, [[]], SamplingParams(temperature=2.0, top_p=0.7))
    expected = np.where(np.arange(5) < 3, flat, 0) / flat[0, :3].sum()
    np.testing.assert_allclose(kept_probs(out), expected, rtol=1e-5, atol=1e-7)


def test_repetition_penalty_by_hand():
    logits = np.array([[2.0, -1.0, 0.5]], dtype=np.float32)
    np.testing.assert_allclose(apply_repetition_penalty(logits, [[0, 1, 1]], 2.0), [[1.0, -2.0, 0.5]])


def test_greedy_is_argmax_and_respects_the_penalty():
    sampler = make_sampler(SamplingParams())
    assert sampler(LOGITS, [[]]).tolist() == [0]
    penalised = make_sampler(SamplingParams(repetition_penalty=10.0))
    assert penalised(np.array([[2.0, 1.0]], np.float32), [[0]]).tolist() == [1]  # 2/10 < 1


def test_same_seed_same_tokens_and_seeds_differ():
    logits = np.zeros((2, 100), np.float32)
    s1, s2 = make_sampler(SamplingParams(temperature=1.0, seed=7)), make_sampler(SamplingParams(temperature=1.0, seed=7))
    a = [s1(logits, [[], []]).tolist() for _ in range(20)]
    b = [s2(logits, [[], []]).tolist() for _ in range(20)]
    assert a == b
    s3 = make_sampler(SamplingParams(temperature=1.0, seed=8))
    assert [s3(logits, [[], []]).tolist() for _ in range(20)] != a


def test_draws_follow_the_kept_distribution():
    sampler = make_sampler(SamplingParams(temperature=1.0, top_k=3, seed=0))
    logits = np.repeat(LOGITS, 4000, axis=0)
    counts = np.bincount(sampler(logits, [[]] * 4000), minlength=5) / 4000
    np.testing.assert_allclose(counts, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=0.03)


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2},
                                    {"min_p": 1.0}, {"repetition_penalty": 0.0}])
def test_bad_parameters_name_themselves(kwargs):
    with pytest.raises(InputError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)
