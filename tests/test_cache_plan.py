"""The core's KV-cache plan (gemmalab.cache_plan), by hand and through the float64 reference run through a
cache that follows it (reference.CachedReference), against the uncached reference: chunked prefill past the
ring's wrap, left padding, blocks looked at without being written, writing only the first k of n tokens."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHAPES, hf_weights, make_hf_model, relative_error, token_ids

from gemmalab import reference
from gemmalab.cache_plan import NO_POSITION, CachePlanner
from gemmalab.errors import InputError

CONFIG = SHAPES["tiny-mqa"]  # window 5, 7 layers (a local layer after the global one)


@pytest.fixture(scope="module")
def weights():
    return hf_weights(make_hf_model(CONFIG))


def test_plan_by_hand_after_the_ring_wraps():
    import dataclasses

    config = dataclasses.replace(CONFIG, sliding_window=3)
    planner = CachePlanner(config, batch=1)
    planner.commit(planner.plan(4))  # indices 0..3 at positions 0..3
    # ring of 3: slot i holds the latest index = i mod 3, so slots hold positions [3, 1, 2]
    assert planner.slot_positions["sliding_attention"].tolist() == [[3, 1, 2]]
    plan = planner.plan(1)
    assert plan.positions.tolist() == [[4]]
    local = plan.layers["sliding_attention"]
    # keys [slot 0 (pos 3), slot 1 (pos 1), slot 2 (pos 2), the new token (pos 4)]: the window of 3 keeps 2..4
    assert local.mask.tolist() == [[[True, False, True, True]]]
    assert local.key_positions.tolist() == [[3, 1, 2, 4]]  # what a captured step's key columns hold
    assert local.write_slots.tolist() == [1] and local.write_tokens.tolist() == [0]  # index 4 -> slot 4 % 3
    assert plan.layers["full_attention"].mask.tolist() == [[[True] * 5]]


def test_padding_rule_by_hand():
    planner = CachePlanner(CONFIG, batch=2, pad_lengths=[1, 0])
    plan = planner.plan(2)
    assert plan.positions.tolist() == [[0, 0], [0, 1]]
    full = plan.layers["full_attention"].mask
    assert full[0].tolist() == [[True, False], [False, True]]  # padding sees itself; the real token not it
    assert full[1].tolist() == [[True, False], [True, True]]
    planner.commit(plan)
    assert planner.slot_positions["full_attention"].tolist() == [[NO_POSITION, 0], [0, 1]]


@pytest.mark.parametrize("chunks", [[1] * 16, [3, 1, 1, 5, 2, 7, 1, 2], [16]])
def test_chunked_feeding_equals_the_uncached_reference(weights, chunks):
    ids = token_ids(CONFIG, batch=2, seq=sum(chunks))  # 16 tokens: past the window of 5 three times
    expected = reference.forward(CONFIG, weights, ids)
    cache = reference.CachedReference(CONFIG, weights, batch=2)
    start = 0
    for n in chunks:
        got = cache.extend(ids[:, start : start + n])
        assert relative_error(got, expected[:, start : start + n]) < 1e-12
        start += n
    assert cache.planner.slot_positions["sliding_attention"].shape[1] == CONFIG.sliding_window  # a ring, no more


def test_left_padded_rows_compute_what_they_would_alone(weights):
    short, long = token_ids(CONFIG, batch=1, seq=6, seed=1)[0], token_ids(CONFIG, batch=1, seq=9, seed=2)[0]
    ids = np.stack([np.concatenate([[0, 0, 0], short]), long])
    cache = reference.CachedReference(CONFIG, weights, batch=2, pad_lengths=[3, 0])
    got = np.concatenate([cache.extend(ids[:, :4]), cache.extend(ids[:, 4:])], axis=1)
    assert relative_error(got[0, 3:], reference.forward(CONFIG, weights, short[None])[0]) < 1e-12
    assert relative_error(got[1], reference.forward(CONFIG, weights, long[None])[0]) < 1e-12
    assert np.isfinite(got).all()  # padding queries stay finite too


def test_a_block_looked_at_without_writing_leaves_the_cache_as_it_was(weights):
    ids = token_ids(CONFIG, batch=1, seq=15, seed=4)
    prefix, block, after = ids[:, :8], ids[:, 8:12], ids[:, 12:]
    cache = reference.CachedReference(CONFIG, weights, batch=1)
    cache.extend(prefix)
    looked = cache.extend(block, write=0)
    assert relative_error(looked, reference.forward(CONFIG, weights, ids[:, :12])[:, 8:]) < 1e-12
    assert cache.planner.length == 8
    cache.extend(block)
    got = cache.extend(after)
    assert relative_error(got, reference.forward(CONFIG, weights, ids)[:, 12:]) < 1e-12


@pytest.mark.parametrize("prefix", [3, 11])  # before and after the ring of 5 wrapped
def test_writing_the_first_k_of_n_equals_feeding_only_those(weights, prefix):
    ids = token_ids(CONFIG, batch=2, seq=prefix + 6, seed=prefix)
    block, k = ids[:, prefix : prefix + 5], 2
    nxt = ids[:, prefix + 5 :]
    partial = reference.CachedReference(CONFIG, weights, batch=2)
    partial.extend(ids[:, :prefix])
    partial.extend(block, write=k)
    only = reference.CachedReference(CONFIG, weights, batch=2)
    only.extend(ids[:, :prefix])
    only.extend(block[:, :k])
    for kind in partial.planner.slot_positions:
        np.testing.assert_array_equal(partial.planner.slot_positions[kind], only.planner.slot_positions[kind])
    for a, b in zip(partial.keys + partial.values, only.keys + only.values, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    truth = reference.forward(CONFIG, weights, np.concatenate([ids[:, :prefix], block[:, :k], nxt], axis=1))
    assert relative_error(partial.extend(nxt), truth[:, -1:]) < 1e-12


def test_a_set_block_decoding_step_equals_the_uncached_reference(weights):
    # accepted tokens are cached; a block of k mask-token queries at the next positions sees all of them
    # and each other (bidirectional within the block), and is not written
    accepted, k = 9, 4
    ids = token_ids(CONFIG, batch=1, seq=accepted + k, seed=7)
    cache = reference.CachedReference(CONFIG, weights, batch=1)
    cache.extend(ids[:, :accepted])
    block_positions = accepted + np.arange(k)
    got = cache.extend(ids[:, accepted:], positions=block_positions, mask=np.ones((k, k), dtype=bool), write=0)
    full = np.tril(np.ones((accepted + k, accepted + k), dtype=bool))
    full[accepted:, accepted:] = True
    expected = reference.forward(CONFIG, weights, ids, mask=full)
    assert relative_error(got, expected[:, accepted:]) < 1e-12
    assert cache.planner.length == accepted


@pytest.mark.parametrize(("kwargs", "message"), [({"write": 3}, "write must be between 0"),
                                                  ({"mask": np.ones((2, 2))}, "mask must be boolean")])
def test_bad_plans_are_named(kwargs, message):
    with pytest.raises(InputError, match=message):
        CachePlanner(CONFIG, batch=1).plan(2, **kwargs)
