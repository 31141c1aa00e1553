"""The numpy reference is the spec, so it is itself checked against transformers in float64."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHAPES, hf_logits, hf_weights, make_hf_model, relative_error, token_ids

from gemmalab import reference


@pytest.mark.parametrize("shape", list(SHAPES))
def test_reference_equals_transformers_in_float64(shape):
    config = SHAPES[shape]
    model = make_hf_model(config).double()
    ids = token_ids(config)
    expected = hf_logits(model, ids)
    actual = reference.forward(config, hf_weights(model), ids)
    # transformers computes RoPE frequencies and the sqrt(hidden) scale in float32 even in a float64 model,
    # which bounds the agreement near 1e-6; a wrong detail (mask, RoPE base, scaling) gives errors of 1e-1.
    assert relative_error(actual, expected) < 3e-6


def test_sliding_window_edge_by_hand():
    """Query i sees key j exactly when i - window < j <= i (hand-derived for window 3)."""
    positions = np.arange(6)[None]
    mask = reference.causal_mask(positions, 3)[0, 0]
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(mask, expected)


def test_rms_norm_multiplies_by_one_plus_weight():
    x = np.array([[3.0, 4.0]])  # mean square 12.5
    w = np.array([0.0, 1.0])
    expected = np.array([[3.0, 8.0]]) / np.sqrt(12.5 + 1e-6)
    np.testing.assert_allclose(reference.rms_norm(x, w, 1e-6), expected, rtol=1e-12)


def test_capture_returns_every_layer():
    config = SHAPES["tiny"]
    model = make_hf_model(config)
    ids = token_ids(config, batch=1, seq=12)
    logits, captured = reference.forward(config, hf_weights(model), ids, capture=True)
    assert len(captured["hidden_states"]) == config.num_hidden_layers + 1
    assert len(captured["attentions"]) == config.num_hidden_layers
    # probabilities sum to one, and a local layer puts no weight outside its window
    probs = captured["attentions"][0]
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)
    assert np.all(probs[..., 11, : 11 - config.sliding_window + 1] == 0)
    assert np.all(captured["attentions"][config.num_hidden_layers - 1][..., 11, :] > 0)  # global sees all
