"""The core's attention masks and the reference's explicit positions, masks and captures, against hand
derivations and against transformers (float64, eager attention, a mask per layer type)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHAPES, hf_weights, make_hf_model, relative_error, token_ids

from gemmalab import masks, reference
from gemmalab.errors import InputError

torch = pytest.importorskip("torch")


def test_set_block_training_layout_by_hand():
    positions, mask = masks.set_block_training(length=4, block=2)
    assert positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    #            clean c0..c3   masked m0..m3   (blocks {0, 1} and {2, 3})
    expected = [[1, 0, 0, 0, 0, 0, 0, 0],  # c0: causal over the clean copy, never the masked one
                [1, 1, 0, 0, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0, 0, 0],
                [1, 1, 1, 1, 0, 0, 0, 0],
                [0, 0, 0, 0, 1, 1, 0, 0],  # m0: its own block, both ways; no clean token is earlier
                [0, 0, 0, 0, 1, 1, 0, 0],
                [1, 1, 0, 0, 0, 0, 1, 1],  # m2: clean tokens of block 0, masked tokens of block 1
                [1, 1, 0, 0, 0, 0, 1, 1]]
    np.testing.assert_array_equal(mask, np.array(expected, dtype=bool))


def test_the_window_applies_on_top_of_an_explicit_mask():
    config = SHAPES["tiny-mqa"]  # window 5
    positions = np.arange(8)[None]
    everything = np.ones((1, 8, 8), dtype=bool)
    local = masks.layer_masks(config, positions, everything)["sliding_attention"][0]
    # a query at position p sees keys at positions above p - 5, before or after it
    expected = np.arange(8)[None, :] > np.arange(8)[:, None] - 5
    np.testing.assert_array_equal(local, expected)
    np.testing.assert_array_equal(masks.layer_masks(config, positions, everything)["full_attention"][0], everything[0])


def assert_captures_match(captured: dict, expected) -> None:
    """The reference's hidden states and attention probabilities equal transformers' output_* ones."""
    for ours, theirs in zip(captured["hidden_states"], expected.hidden_states, strict=True):
        assert relative_error(ours, theirs.numpy()) < 3e-6
    for ours, theirs in zip(captured["attentions"], expected.attentions, strict=True):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-6)


def _transformers(model, ids, positions, per_type):
    """transformers' logits and captures with one additive float mask per layer type."""
    additive = {kind: torch.as_tensor(np.where(m[:, None], 0.0, -1e30)) for kind, m in per_type.items()}
    with torch.no_grad():
        return model(torch.as_tensor(ids), position_ids=torch.as_tensor(np.array(positions)), attention_mask=additive,
                     output_hidden_states=True, output_attentions=True)


@pytest.mark.parametrize("shape", ["tiny", "tiny-mqa"])
def test_reference_with_set_block_masks_equals_transformers(shape):
    config = SHAPES[shape]
    model = make_hf_model(config).double()
    model.config._attn_implementation = "eager"  # attention probabilities come from the eager path only
    length = int(config.sliding_window * 2.5)  # past the window, so local layers cut the masked rows too
    positions, mask = masks.set_block_training(length, block=4)
    ids = token_ids(config, batch=2, seq=2 * length)
    batch_positions = np.broadcast_to(positions, (2, 2 * length))
    expected = _transformers(model, ids, batch_positions,
                             masks.layer_masks(config, batch_positions, np.broadcast_to(mask, (2, *mask.shape))))
    logits, captured = reference.forward(config, hf_weights(model), ids, positions=positions, mask=mask, capture=True)
    assert relative_error(logits, expected.logits.numpy()) < 3e-6
    assert_captures_match(captured, expected)


def test_reference_captures_follow_transformers_conventions():
    config = SHAPES["tiny"]
    model = make_hf_model(config).double()
    model.config._attn_implementation = "eager"
    ids = token_ids(config, batch=2)
    with torch.no_grad():
        expected = model(torch.as_tensor(ids), output_hidden_states=True, output_attentions=True)
    _, captured = reference.forward(config, hf_weights(model), ids, capture=True)
    # embeddings, each block's output, and the last block's output after the final norm
    assert len(captured["hidden_states"]) == config.num_hidden_layers + 1
    assert_captures_match(captured, expected)


def test_an_explicit_causal_mask_changes_nothing():
    config = SHAPES["tiny"]
    weights = hf_weights(make_hf_model(config))
    ids = token_ids(config, batch=2)
    seq = ids.shape[1]
    causal = np.tril(np.ones((seq, seq), dtype=bool))
    np.testing.assert_array_equal(reference.forward(config, weights, ids, mask=causal), reference.forward(config, weights, ids))


@pytest.mark.parametrize(("positions", "mask", "message"), [
    (np.arange(5), None, "positions must be integers of shape"),
    (np.arange(6) - 1, None, "positions must be >= 0"),
    (None, np.ones((6, 6)), "mask must be boolean"),
    (None, np.ones((3, 6, 6), dtype=bool), "mask has 3 rows for a batch of 2"),
])
def test_bad_positions_and_masks_are_named(positions, mask, message):
    config = SHAPES["tiny"]
    weights = hf_weights(make_hf_model(config))
    with pytest.raises(InputError, match=message):
        reference.forward(config, weights, token_ids(config, batch=2, seq=6), positions=positions, mask=mask)
