"""Capture through a KV cache (``Model.new_cache`` / ``Model.extend``, ``Backend.extend_forward``) on every
backend: hidden states and attention probabilities of cached steps, against the uncached ``Model.forward``
of the whole sequence, the float64 reference run through the same cache plan (reference.CachedReference),
and transformers' cached eager attention (DynamicCache), before and after the local layers' ring wraps.

A cached step's key axis is the cache plan's (gemmalab.cache_plan): the slots held before the step, in slot
order, then the new tokens; ``key_positions`` names the position of each column, so the tests map the
columns onto positions to compare with an uncached pass (whose key axis is the positions themselves)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from conftest import SHAPES, hf_weights, relative_error, token_ids

import gemmalab
from gemmalab import reference
from gemmalab.cache_plan import NO_POSITION
from gemmalab.errors import InputError

torch = pytest.importorskip("torch")

CONFIG = SHAPES["tiny"]  # 6 layers (LLLLLG), window 8, GQA 4 over 2
LOCAL, GLOBAL = 1, CONFIG.layer_types.index("full_attention")
HIDDEN = [0, 2, -1]  # the embeddings, a block's output, the last one after the final norm
# A prefill, then cached steps: 16 tokens, the ring of 8 wraps at the 9th. One chunk length and a global buffer
# that holds them all keep JAX to one compiled step (each one costs seconds here).
CHUNKS = [4, 4, 4, 4]


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    config, hf_model, folder = tiny_hf
    return hf_model, folder, hf_weights(hf_model)


def by_position(probs: np.ndarray, key_positions: np.ndarray, length: int) -> np.ndarray:
    """Probabilities [batch, heads, n, keys] in a cache's key order -> [batch, heads, n, length] by the
    position each key holds (padding columns, NO_POSITION, dropped)."""
    batch, heads, n, _ = probs.shape
    out = np.zeros((batch, heads, n, length))
    for row in range(batch):
        held = key_positions[row] != NO_POSITION
        np.add.at(out[row], (slice(None), slice(None), key_positions[row][held]), probs[row][..., held])
    return out


def test_cached_steps_capture_what_the_uncached_forward_does(backend, tiny):
    _, folder, _ = tiny
    model = gemmalab.load(folder, backend=backend, dtype="float32")
    ids = token_ids(CONFIG, batch=2, seq=sum(CHUNKS), seed=7)
    full = model.forward(ids, hidden_states=HIDDEN, attentions=[LOCAL, GLOBAL])
    cache, start, wrapped = model.new_cache(batch=2), 0, False
    for n in CHUNKS:
        end = start + n
        out = model.extend(cache, ids[:, start:end], hidden_states=HIDDEN, attentions=[LOCAL, GLOBAL])
        assert cache.length == end
        assert relative_error(out.logits, full.logits[:, start:end]) < 1e-5, start
        assert sorted(out.hidden_states) == sorted(full.hidden_states) == [0, 2, CONFIG.num_hidden_layers]
        for i, ours in out.hidden_states.items():  # row for row: the new tokens only
            assert relative_error(ours, full.hidden_states[i][:, start:end]) < 1e-5, (start, i)
        assert sorted(out.attentions) == sorted(out.key_positions) == [LOCAL, GLOBAL]
        for layer, ours in out.attentions.items():
            held = min(start, CONFIG.sliding_window) if layer == LOCAL else start  # slots before this step
            assert ours.shape == (2, CONFIG.num_attention_heads, n, held + n)
            keys = out.key_positions[layer]
            assert keys[:, held:].tolist() == [list(range(start, end))] * 2  # the new tokens come last
            np.testing.assert_allclose(
                by_position(ours, keys, end),
                full.attentions[layer][:, :, start:end, :end],
                atol=2e-6,
                err_msg=f"layer {layer} at {start}",
            )
        ring = out.key_positions[LOCAL][:, : min(start, CONFIG.sliding_window)]  # the local slots held
        wrapped |= bool(np.any(np.diff(ring) < 0))  # slot order is no longer position order
        start = end
    assert wrapped, "the local layers' ring never wrapped inside a step's keys"


def test_a_set_block_step_captures_what_the_cached_reference_does(backend, tiny):
    """Left padding on one row, a prefill that fills the ring, then a block at repeated positions under an
    explicit mask of which only the first two tokens are written (they wrap the ring), then a plain step:
    each step's captures equal the float64 reference's through the same plan, column for column."""
    _, folder, weights = tiny
    model = gemmalab.load(folder, backend=backend, dtype="float32")
    pads = [2, 0]
    oracle = reference.CachedReference(CONFIG, weights, batch=2, pad_lengths=pads)
    cache = model.new_cache(batch=2, pad_lengths=pads)
    ids = token_ids(CONFIG, batch=2, seq=16, seed=9)
    positions = np.array([[6, 6, 7, 7], [8, 8, 9, 9]])  # each row's next positions, each one repeated
    block_mask = np.ones((2, 4, 4), dtype=bool)
    block_mask[1] = np.tril(block_mask[1])  # row 0 bidirectional inside the block, row 1 causal
    block = {"positions": positions, "mask": block_mask, "write": 2}
    # the block reads the full ring, and its two written tokens wrap it for the step after
    steps = [(slice(0, 4), {}), (slice(4, 8), {}), (slice(8, 12), block), (slice(12, 16), {})]
    for chunk, plan in steps:
        out = model.extend(cache, ids[:, chunk], hidden_states=HIDDEN, attentions=[LOCAL, GLOBAL], **plan)
        expected, captured = oracle.extend(ids[:, chunk], capture=True, **plan)
        assert relative_error(out.logits, expected) < 1e-5, chunk
        for i, ours in out.hidden_states.items():
            assert relative_error(ours, captured["hidden_states"][i]) < 1e-5, (chunk, i)
        for layer, ours in out.attentions.items():
            np.testing.assert_allclose(
                ours, captured["attentions"][layer], atol=2e-6, err_msg=f"layer {layer}"
            )
            np.testing.assert_array_equal(out.key_positions[layer], captured["key_positions"][layer])
    assert cache.length == 8 + 2 + 4


def test_cached_steps_capture_what_transformers_cached_eager_attention_does(backend, tiny):
    """transformers' DynamicCache keeps a local layer's last window - 1 keys, in position order, and returns
    [those, the new ones]: a contiguous run of positions ending at the step's last, so its attention columns
    map onto positions as ours do, and the two must agree after the mapping."""
    hf_model, folder, _ = tiny
    model = gemmalab.load(folder, backend=backend, dtype="float32")
    ids = token_ids(CONFIG, batch=2, seq=sum(CHUNKS), seed=7)
    eager = hf_model.config._attn_implementation
    hf_model.config._attn_implementation = "eager"  # transformers returns probabilities from eager only
    try:
        hf_cache, keyword = transformers_cache(hf_model)
        cache, start = model.new_cache(batch=2), 0
        for n in CHUNKS:
            end = start + n
            with torch.no_grad():
                theirs = hf_model(
                    torch.as_tensor(ids[:, start:end]),
                    **{keyword: hf_cache},
                    use_cache=True,
                    output_hidden_states=True,
                    output_attentions=True,
                )
            out = model.extend(cache, ids[:, start:end], hidden_states=HIDDEN, attentions=[LOCAL, GLOBAL])
            assert relative_error(out.logits, theirs.logits.numpy()) < 1e-5, start
            for i, ours in out.hidden_states.items():
                assert relative_error(ours, theirs.hidden_states[i].numpy()) < 1e-5, (start, i)
            for layer, ours in out.attentions.items():
                probs = theirs.attentions[layer].numpy()  # [batch, heads, n, kv_len]
                held = np.broadcast_to(np.arange(end - probs.shape[-1], end), (2, probs.shape[-1]))
                np.testing.assert_allclose(
                    by_position(ours, out.key_positions[layer], end),
                    by_position(probs, held, end),
                    atol=2e-6,
                    err_msg=f"layer {layer}",
                )
            start = end
    finally:
        hf_model.config._attn_implementation = eager


def transformers_cache(hf_model):
    """A DynamicCache laid out by the model's config (sliding layers keep their window), and the keyword
    the model's forward takes it by (``cache`` from transformers 5.x, ``past_key_values`` before)."""
    from transformers import DynamicCache

    try:
        made = DynamicCache(config=hf_model.config)
    except TypeError:  # older transformers: one layout for every layer, all keys in position order
        made = DynamicCache()
    keyword = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    return made, keyword


@pytest.fixture(scope="module")
def first():
    return gemmalab.init(CONFIG, backend=gemmalab.backends()[0], seed=1)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m: ([1, 2], {"cache": "not a cache"}), "cache must come from Model.new_cache"),
        (
            lambda m: ([1, 2], {"cache": gemmalab.init(CONFIG, backend=m.backend).new_cache()}),
            "another model",
        ),
        (lambda m: ([[1, 2]] * 3, {}), "holds 2 rows but ids have 3"),
        (lambda m: ([[1, 2]] * 2, {"write": 3}), "write must be between 0 and the 2"),
        (lambda m: ([[1, 2]] * 2, {"positions": [0, -1]}), "positions must be >= 0"),
        (lambda m: ([[1, 2]] * 2, {"mask": np.zeros((2, 2), dtype=bool)}), "attend to no key"),
        (lambda m: ([[1, 2]] * 2, {"attentions": [6]}), "attentions index 6"),
        (lambda m: ([[1, 2]] * 2, {"hidden_states": [7]}), "hidden_states index 7"),
        (lambda m: ([[1, 999]] * 2, {}), "token ids must lie in"),
    ],
)
def test_bad_cached_input_is_named_and_changes_nothing(first, make, message):
    cache = first.new_cache(batch=2)
    ids, kwargs = make(first)
    kwargs.setdefault("cache", cache)
    with pytest.raises(InputError, match=message):
        first.extend(kwargs.pop("cache"), ids, **kwargs)
    assert cache.length == 0
    out = first.extend(cache, [[1, 2], [3, 4]], attentions=[0])  # the cache still works from the start
    assert out.logits.shape == (2, 2, CONFIG.vocab_size) and out.key_positions[0].tolist() == [[0, 1]] * 2


def test_new_cache_checks_its_arguments(first):
    with pytest.raises(InputError, match="batch must be a positive integer"):
        first.new_cache(batch=0)
    with pytest.raises(InputError, match="pad_lengths has 1 entries but batch is 2"):
        first.new_cache(batch=2, pad_lengths=[1])
