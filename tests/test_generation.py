"""Generation on every backend: KV caches against full recomputation, greedy tokens against transformers,
flat local-layer cache memory, batching, seeding, stopping. Oracles: the numpy reference (full forward over
the whole sequence at every step) and transformers' ``generate``."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHAPES, hf_weights, make_hf_model, relative_error, save_hf, torch

import gemmalab
from gemmalab import reference
from gemmalab.backend import get_backend

FP32_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Per shape: (config, fp32 weights, transformers model, checkpoint folder)."""
    out = {}
    for name in ("tiny", "tiny-mqa"):
        config = SHAPES[name]
        hf = make_hf_model(config, seed=11)
        out[name] = (config, hf_weights(hf), hf, save_hf(hf, tmp_path_factory.mktemp(f"gen-{name}")))
    return out


@pytest.mark.parametrize("shape", ["tiny", "tiny-mqa"])
@pytest.mark.parametrize("chunk", [1, 3, "window", "window+3", "whole"])
def test_cached_decoding_equals_full_recomputation(backend, shape, chunk, tiny_models):
    """Prompt 2.5 windows long fed in chunks, then 2.5 windows of decoding: every step's logits equal the
    reference run over the whole sequence so far (the ring buffer has wrapped several times by the end)."""
    config, weights, _, _ = tiny_models[shape]
    window = config.sliding_window
    size = {"window": window, "window+3": window + 3, "whole": 10_000}.get(chunk, chunk)
    be = get_backend(backend)
    native = be.build(config, weights, dtype="float32", device="cpu")
    rng = np.random.default_rng(5)
    sequence = rng.integers(0, config.vocab_size, size=(2, int(2.5 * window) + 1))
    cache = be.new_cache(native, batch=2)

    for start in range(0, sequence.shape[1], size):
        chunk_ids = sequence[:, start : start + size]
        logits = be.extend(native, cache, chunk_ids, logits="all")
        expected = reference.forward(config, weights, sequence[:, : start + chunk_ids.shape[1]])[:, start:]
        assert relative_error(logits, expected) < FP32_TOLERANCE
    for _ in range(int(2.5 * window)):
        token = rng.integers(0, config.vocab_size, size=(2, 1))
        sequence = np.concatenate([sequence, token], axis=1)
        logits = be.extend(native, cache, token, logits="last")
        assert logits.shape == (2, config.vocab_size)
        assert relative_error(logits, reference.forward(config, weights, sequence)[:, -1]) < FP32_TOLERANCE


def test_local_cache_memory_stays_at_the_window(backend, tiny_models):
    config, weights, _, _ = tiny_models["tiny"]
    be = get_backend(backend)
    native = be.build(config, weights, dtype="float32", device="cpu")
    cache = be.new_cache(native, batch=2)
    window, n_local = config.sliding_window, sum(map(config.is_sliding, range(config.num_hidden_layers)))
    # keys + values, batch 2, kv heads x head_dim, fp32: the window exactly, on every local layer
    local_bytes = n_local * 2 * 2 * config.num_key_value_heads * window * config.head_dim * 4
    sizes = []
    for _ in range(8):
        be.extend(native, cache, np.ones((2, window), dtype=np.int64), logits="none")
        sizes.append(be.cache_nbytes(cache))
    assert all(s["sliding_attention"] == local_bytes for s in sizes)
    global_sizes = [s["full_attention"] for s in sizes]
    assert global_sizes[-1] > global_sizes[0]  # global layers keep every position
    per_position = (config.num_hidden_layers - n_local) * 2 * 2 * config.num_key_value_heads * config.head_dim * 4
    assert global_sizes[-1] >= per_position * 8 * window


@pytest.mark.parametrize("shape", ["tiny", "tiny-mqa"])
def test_greedy_tokens_equal_transformers_generate(backend, shape, tiny_models):
    config, _, hf, folder = tiny_models[shape]
    prompt = np.random.default_rng(1).integers(3, config.vocab_size, size=3 * config.sliding_window).tolist()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    ours = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu").generate(prompt, max_tokens=24)
    assert ours.tokens == theirs[: len(ours.tokens)] and len(ours.tokens) in (len(theirs), 24)


def test_batched_left_padded_equals_one_by_one(backend, tiny_models):
    config, _, _, folder = tiny_models["tiny"]
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, config.vocab_size, size=n).tolist() for n in (21, 9, 14)]
    batched = model.generate(prompts, max_tokens=12, stop=[])
    for prompt, row in zip(prompts, batched.tokens, strict=True):
        assert model.generate(prompt, max_tokens=12).tokens == row


def test_same_seed_same_tokens(backend, tiny_models):
    config, _, _, folder = tiny_models["tiny-mqa"]
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    prompt = list(range(3, 20))
    kwargs = dict(max_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=123)
    first = model.generate(prompt, **kwargs).tokens
    assert model.generate(prompt, **kwargs).tokens == first
    assert model.generate(prompt, **{**kwargs, "seed": 124}).tokens != first


def test_stops_at_a_stop_id_and_stream_agrees(backend, tiny_models):
    config, _, _, folder = tiny_models["tiny"]
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    prompt = list(range(30, 55))
    free = model.generate(prompt, max_tokens=10, stop=[])
    assert free.finish_reasons == ["length"] and len(free.tokens) == 10
    stop_at = free.tokens[4]
    first = free.tokens.index(stop_at)
    stopped = model.generate(prompt, max_tokens=10, stop=[stop_at])
    assert stopped.tokens == free.tokens[: first + 1] and stopped.finish_reasons == ["stop"]
    streamed = list(model.stream(prompt, max_tokens=10, stop=[stop_at]))
    assert [c.token for c in streamed] == stopped.tokens and streamed[-1].is_stop


def test_prefill_runs_the_head_on_the_last_position_only(backend, tiny_models):
    """logits="last" returns [batch, vocab], equal to the last row of the full forward."""
    config, weights, _, _ = tiny_models["tiny"]
    be = get_backend(backend)
    native = be.build(config, weights, dtype="float32", device="cpu")
    ids = np.random.default_rng(3).integers(0, config.vocab_size, size=(2, 20))
    out = be.extend(native, be.new_cache(native, batch=2), ids, logits="last")
    assert out.shape == (2, config.vocab_size)
    assert relative_error(out, reference.forward(config, weights, ids)[:, -1]) < FP32_TOLERANCE
    assert be.extend(native, be.new_cache(native, batch=2), ids, logits="none") is None


def test_greedy_ahead_on_the_device_equals_the_host_argmax(backend, tiny_models):
    # A backend that decodes greedily on its device, a step ahead (backend.GreedyAhead), must give the tokens
    # of the host path: float32 logits to numpy, then the core's argmax. Batched, left-padded, generating
    # past twice the window so the ring buffers wrap.
    from gemmalab.backend import GreedyAhead
    from gemmalab.generation import Generator, generate_ids

    native = get_backend(backend)
    if not isinstance(native, GreedyAhead):
        pytest.skip(f"the {backend} backend decodes through the host only")
    config, _, _, folder = tiny_models["tiny"]
    model = gemmalab.load(folder, backend=backend, dtype="float32", device="cpu")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, config.vocab_size, size=n).tolist() for n in (13, 5, 9)]
    steps = 2 * config.sliding_window + 5

    def run(device: bool, stop: frozenset[int]):
        return generate_ids(Generator(native, model.native, config, prompts, stop_ids=stop, device_greedy=device), steps)

    free = run(False, frozenset())
    stop = frozenset({free.token_rows[1][3]})  # ends row 1 early; the others go on in lock-step
    host = run(False, stop)
    assert host.finish_reasons[1] == "stop" and len(host.token_rows[1]) <= 4
    assert Generator(native, model.native, config, prompts).greedy_ahead  # the device path is the one taken
    assert run(True, frozenset()).token_rows == free.token_rows
    device = run(True, stop)
    assert device.token_rows == host.token_rows and device.finish_reasons == host.finish_reasons
