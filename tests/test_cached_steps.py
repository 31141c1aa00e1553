"""Cached extends with explicit positions, masks over the new tokens and partial writes (the core's cache
plan, gemmalab.cache_plan), on every backend, against the float64 reference run through the same plan
(reference.CachedReference) and the uncached reference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHAPES, hf_weights, make_hf_model, relative_error, token_ids

from gemmalab import reference
from gemmalab.backend import get_backend

CONFIG = SHAPES["tiny"]  # window 8, GQA 4 over 2


@pytest.fixture(scope="module")
def weights():
    return hf_weights(make_hf_model(CONFIG))


def _build(backend, weights):
    return get_backend(backend).build(CONFIG, weights, dtype="float32")


@pytest.mark.parametrize("accepted", [5, 13])  # before and after the local layers' ring (8) wrapped
def test_a_set_block_step_equals_the_reference(backend, weights, accepted):
    be = get_backend(backend)
    native = _build(backend, weights)
    k = 4
    ids = token_ids(CONFIG, batch=2, seq=accepted + k + 1, seed=accepted)
    cache, oracle = be.new_cache(native, batch=2), reference.CachedReference(CONFIG, weights, batch=2)
    be.extend(native, cache, ids[:, :accepted], logits="none")
    oracle.extend(ids[:, :accepted])
    block, positions, inside = ids[:, accepted : accepted + k], accepted + np.arange(k), np.ones((k, k), dtype=bool)
    got = be.extend(native, cache, block, logits="all", positions=positions, mask=inside, write=0)
    expected = oracle.extend(block, positions=positions, mask=inside, write=0)
    assert relative_error(got, expected) < 1e-5
    # and the uncached reference: causal over the accepted tokens, the block bidirectional after them
    full = np.tril(np.ones((accepted + k, accepted + k), dtype=bool))
    full[accepted:, accepted:] = True
    assert relative_error(got, reference.forward(CONFIG, weights, ids[:, : accepted + k], mask=full)[:, accepted:]) < 1e-5
    # accept the first two of the block: write them (plain causal), then the cache goes on as if fed only those
    be.extend(native, cache, block, logits="none", write=2)
    nxt = ids[:, -1:]
    truth = reference.forward(CONFIG, weights, np.concatenate([ids[:, :accepted], block[:, :2], nxt], axis=1))
    assert relative_error(be.extend(native, cache, nxt, logits="last"), truth[:, -1]) < 1e-5



def test_a_planned_step_on_left_padded_rows_equals_the_planned_reference(backend, weights):
    be = get_backend(backend)
    native = _build(backend, weights)
    ids = token_ids(CONFIG, batch=2, seq=14, seed=9)
    ids[0, :2] = 0  # row 0 is left-padded by two
    cache = be.new_cache(native, batch=2, pad_lengths=[2, 0])
    oracle = reference.CachedReference(CONFIG, weights, batch=2, pad_lengths=[2, 0])
    be.extend(native, cache, ids[:, :10], logits="none")
    oracle.extend(ids[:, :10])
    positions = np.array([[8, 8, 9, 9], [10, 10, 11, 11]])  # each row's next positions, each one repeated
    block_mask = np.tril(np.ones((4, 4), dtype=bool))
    got = be.extend(native, cache, ids[:, 10:], logits="all", positions=positions, mask=block_mask, write=1)
    expected = oracle.extend(ids[:, 10:], positions=positions, mask=block_mask, write=1)
    assert relative_error(got, expected) < 1e-5
    follow = ids[:, 11:12]
    assert relative_error(be.extend(native, cache, follow, logits="last"), oracle.extend(follow)[:, -1]) < 1e-5


def test_one_padding_rule_the_fast_path_and_the_plan_agree_on_padding_rows_too(backend, weights):
    # The fast path of plain steps and the plan must give the same outputs everywhere, padding queries
    # included (their outputs are unused, but one rule for every backend means the same numbers).
    be = get_backend(backend)
    native = _build(backend, weights)
    # row 0's three padding tokens hold different ids: a padding query that mixed them would differ
    ids = token_ids(CONFIG, batch=2, seq=12, seed=11)
    fast, planned = be.new_cache(native, batch=2, pad_lengths=[3, 0]), be.new_cache(native, batch=2, pad_lengths=[3, 0])
    for chunk in (slice(0, 5), slice(5, 6), slice(6, 12)):
        a = be.extend(native, fast, ids[:, chunk], logits="all")
        n = chunk.stop - chunk.start
        b = be.extend(native, planned, ids[:, chunk], logits="all", write=n)  # write=n: the same step, by the plan
        assert relative_error(a, b) < 1e-5, chunk
