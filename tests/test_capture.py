"""The model contract's uncached forward on every backend: explicit positions and masks, hidden states and
attention probabilities, checked against the float64 reference and against transformers (eager attention),
on sequences longer than the sliding window."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHAPES, hf_weights, relative_error, token_ids

import gemmalab
from gemmalab import masks, reference
from gemmalab.errors import InputError

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    config, hf_model, folder = tiny_hf
    return config, hf_model, folder, hf_weights(hf_model)


def test_capture_equals_transformers(backend, tiny):
    config, hf_model, folder, _ = tiny
    model = gemmalab.load(folder, backend=backend, dtype="float32")
    ids = token_ids(config, batch=2)  # 2.5 windows
    eager = hf_model.config._attn_implementation
    hf_model.config._attn_implementation = "eager"  # transformers returns probabilities from eager only
    try:
        with torch.no_grad():
            expected = hf_model(torch.as_tensor(ids), output_hidden_states=True, output_attentions=True)
    finally:
        hf_model.config._attn_implementation = eager
    out = model.forward(ids, hidden_states=True, attentions=True)
    assert relative_error(out.logits, expected.logits.numpy()) < 1e-5
    assert sorted(out.hidden_states) == list(range(config.num_hidden_layers + 1))
    for i, theirs in enumerate(expected.hidden_states):
        assert relative_error(out.hidden_states[i], theirs.numpy()) < 1e-5, i
    for i, theirs in enumerate(expected.attentions):
        np.testing.assert_allclose(out.attentions[i], theirs.numpy(), atol=2e-6, err_msg=f"layer {i}")


def test_set_block_positions_and_mask_equal_the_reference(backend, tiny):
    config, _, folder, weights = tiny
    model = gemmalab.load(folder, backend=backend, dtype="float32")
    length = int(config.sliding_window * 2.5)
    positions, mask = masks.set_block_training(length, block=4)
    ids = token_ids(config, batch=2, seq=2 * length, seed=3)
    expected, captured = reference.forward(config, weights, ids, positions=positions, mask=mask, capture=True)
    last = config.num_hidden_layers - 1
    out = model.forward(ids, positions=positions, mask=mask, hidden_states=[0, 2, -1], attentions=[0, last])
    assert relative_error(out.logits, expected) < 1e-5
    assert sorted(out.hidden_states) == [0, 2, config.num_hidden_layers]
    for i, ours in out.hidden_states.items():
        assert relative_error(ours, captured["hidden_states"][i]) < 1e-5, i
    assert sorted(out.attentions) == [0, last]  # only the layers asked for
    for i, ours in out.attentions.items():
        np.testing.assert_allclose(ours, captured["attentions"][i], atol=2e-6, err_msg=f"layer {i}")
        # a clean token never attends to the masked copy
        assert np.all(ours[:, :, :length, length:] == 0)


def test_plain_forward_is_the_logits(backend, tiny):
    config, _, folder, weights = tiny
    model = gemmalab.load(folder, backend=backend, dtype="float32")
    ids = token_ids(config, batch=2, seed=5)
    out = model.forward(ids)
    assert out.hidden_states == {} and out.attentions == {}
    assert relative_error(out.logits, reference.forward(config, weights, ids)) < 1e-5
    shifted = model.forward(ids, positions=np.arange(ids.shape[1]) + 7)  # positions drive RoPE only
    assert relative_error(shifted.logits, reference.forward(config, weights, ids, positions=np.arange(ids.shape[1]) + 7)) < 1e-5


def test_a_pass_without_logits_gives_the_same_hidden_states(backend, tiny):
    """logits=False (a distillation teacher's pass) skips the head and keeps the captures exact."""
    config, _, folder, weights = tiny
    model = gemmalab.load(folder, backend=backend, dtype="float32")
    ids = token_ids(config, batch=2, seed=6)
    _, captured = reference.forward(config, weights, ids, capture=True)
    last = config.num_hidden_layers
    out = model.forward(ids, hidden_states=[last], logits=False)
    assert out.logits is None and sorted(out.hidden_states) == [last]
    assert relative_error(out.hidden_states[last], captured["hidden_states"][last]) < 1e-5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"hidden_states": [99]}, "hidden_states index 99"),
    ({"attentions": ["a"]}, "attentions index 'a'"),
    ({"mask": np.zeros((6, 6), dtype=bool)}, "attend to no key"),
    ({"positions": np.arange(5)}, "positions must be integers of shape"),
])
def test_bad_captures_are_named(kwargs, message):
    model = gemmalab.init(SHAPES["tiny"], backend=gemmalab.backends()[0])
    with pytest.raises(InputError, match=message):
        model.forward(np.arange(6)[None] + 5, **kwargs)
