"""A layer-streamed model: partial builds, Backend.run_layers / head_chunks, gemmalab.streaming.LayerStream,
and a teacher cache built with only a few blocks resident (``gemmalab distill cache --stream-layers``).

Oracles: the float64 numpy reference (gemmalab.reference, its captured hidden states in transformers'
convention), the same backend's resident model, and a cache built with the resident teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import assert_clean_failure, run_cli
from conftest import BACKENDS, SHAPES, relative_error, token_ids
from test_distill_cache import CONFIG, build, shard_arrays

from gemmalab import reference
from gemmalab.backend import get_backend
from gemmalab.errors import BackendError, CheckpointError, ConfigError, InputError
from gemmalab.masks import layer_masks
from gemmalab.params import EMBED, FINAL_NORM, init_weights, parameter_bytes
from gemmalab.stages import stage_names
from gemmalab.streaming import LayerStream

pytest_plugins = ["test_distill_cache"]  # its teacher and corpus fixtures

SEQ = 21  # longer than the tiny preset's window of 8, so local layers mask what global ones see


def random_weights(config, seed: int = 1) -> dict[str, np.ndarray]:
    """std 0.3 and randomised norms: distributions far from uniform, every parameter mattering."""
    rng = np.random.default_rng(seed)
    weights = init_weights(config, seed=seed, std=0.3)
    return {name: (rng.normal(0.0, 0.3, w.shape).astype(np.float32) if name.endswith("norm.weight") else w)
            for name, w in weights.items()}


def layout(config, rows: int, seq: int) -> dict:
    positions = np.broadcast_to(np.arange(seq), (rows, seq)).copy()
    return {"positions": positions, "masks": layer_masks(config, positions)}


def stage(engine, config, weights, dtype="float32", **which):
    return engine.build(config, {name: weights[name] for name in stage_names(config, **which)}, dtype=dtype, partial=True)


# ---------------------------------------------------------------------------------------------------------
# gemmalab.stages
# ---------------------------------------------------------------------------------------------------------
def test_stage_names_by_hand():
    config = SHAPES["tiny"]
    assert stage_names(config, embed=True) == [EMBED]
    assert stage_names(config, head=True) == [FINAL_NORM, EMBED]  # tied: the embedding is the head
    assert stage_names(SHAPES["untied-softcap"], head=True) == [FINAL_NORM, "lm_head.weight"]
    block = stage_names(config, layers=range(2, 3))
    assert len(block) == 13 and all(name.startswith("model.layers.2.") for name in block)  # 4 + 2 + 3 + 4 norms
    every = stage_names(config, embed=True, layers=range(config.num_hidden_layers), head=True)
    assert sorted(every) == sorted(init_weights(config))
    with pytest.raises(InputError, match="layers must be a range of consecutive blocks within 0..6"):
        stage_names(config, layers=range(4, 7))


# ---------------------------------------------------------------------------------------------------------
# The contract: run_layers and head_chunks, whole and partial models
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["tiny", "untied-softcap"])
def test_stages_chain_to_the_reference(backend, shape):
    """Embedding, three uneven groups of blocks and the head, each a partial model of its own weights:
    every residual stream is the reference's hidden state and the logits are its logits."""
    config = SHAPES[shape]
    weights = random_weights(config)
    engine = get_backend(backend)
    ids = token_ids(config, batch=2, seq=SEQ, seed=4)
    expected, captured = reference.forward(config, weights, ids, capture=True)
    where = layout(config, 2, SEQ)
    stream = engine.run_layers(stage(engine, config, weights, embed=True), ids, layers=range(0), **where)
    assert stream.dtype == np.float32 and stream.shape == (2, SEQ, config.hidden_size)
    assert relative_error(stream, captured["hidden_states"][0]) < 1e-6
    for group in (range(0, 1), range(1, 4), range(4, config.num_hidden_layers)):
        stream = engine.run_layers(stage(engine, config, weights, layers=group), stream, layers=group, **where)
        if group.stop < config.num_hidden_layers:  # the last index of the capture is after the final norm
            assert relative_error(stream, captured["hidden_states"][group.stop]) < 1e-5
    chunks = list(engine.head_chunks(stage(engine, config, weights, head=True), stream, chunk_tokens=8))
    assert [start for start, _ in chunks] == [0, 8, 16]
    logits = np.concatenate([chunk for _, chunk in chunks], axis=1)
    assert logits.dtype == np.float32 and relative_error(logits, expected) < 1e-5


def test_whole_model_runs_stages_too(backend):
    """A whole model takes run_layers and head_chunks as well: its stream after every block, then its own logits."""
    weights = random_weights(CONFIG)
    engine = get_backend(backend)
    model = engine.build(CONFIG, weights, dtype="float32")
    ids = token_ids(CONFIG, batch=1, seq=SEQ, seed=5)
    stream = engine.run_layers(model, ids, layers=range(CONFIG.num_hidden_layers), **layout(CONFIG, 1, SEQ))
    logits = np.concatenate([chunk for _, chunk in engine.head_chunks(model, stream, chunk_tokens=64)], axis=1)
    assert relative_error(logits, engine.logits(model, ids)) < 1e-5


def test_bfloat16_stream_crosses_in_bfloat16(backend):
    """A bf16 model's residual stream comes out in bf16 (ml_dtypes), and going through the host between
    stages gives the resident bf16 model's logits."""
    weights = random_weights(CONFIG)
    engine = get_backend(backend)
    ids = token_ids(CONFIG, batch=1, seq=SEQ, seed=6)
    where = layout(CONFIG, 1, SEQ)
    stream = engine.run_layers(stage(engine, CONFIG, weights, "bfloat16", embed=True), ids, layers=range(0), **where)
    assert stream.dtype.name == "bfloat16"
    for group in (range(0, 3), range(3, 6)):
        stream = engine.run_layers(stage(engine, CONFIG, weights, "bfloat16", layers=group), stream, layers=group, **where)
    head = stage(engine, CONFIG, weights, "bfloat16", head=True)
    logits = np.concatenate([chunk for _, chunk in engine.head_chunks(head, stream, chunk_tokens=64)], axis=1)
    resident = engine.logits(engine.build(CONFIG, weights, dtype="bfloat16"), ids)
    scale = float(np.abs(resident).max())
    assert float(np.abs(logits - resident).max()) <= 0.02 * scale  # bf16 rounding, kernel order aside


def test_partial_model_holds_only_its_stage_and_refuses_the_rest(backend):
    weights = random_weights(CONFIG)
    engine = get_backend(backend)
    group = range(2, 4)
    model = stage(engine, CONFIG, weights, layers=group)
    # only what it was given counts as resident: the others are shape-only
    stream = np.zeros((1, SEQ, CONFIG.hidden_size), np.float32)
    where = layout(CONFIG, 1, SEQ)
    engine.run_layers(model, stream, layers=group, **where)  # its own stage runs
    with pytest.raises(InputError, match="this partial model does not hold model.layers.4"):
        engine.run_layers(model, stream, layers=range(2, 5), **where)
    with pytest.raises(InputError, match=f"does not hold {EMBED}"):
        engine.run_layers(model, token_ids(CONFIG, batch=1, seq=SEQ), layers=group, **where)
    with pytest.raises(InputError, match=f"does not hold {FINAL_NORM}"):
        engine.head_chunks(model, stream)
    for whole_model_method in (lambda: engine.logits(model, token_ids(CONFIG, batch=1, seq=4)),
                               lambda: engine.weights(model)):
        with pytest.raises(BackendError, match="built with partial=True"):
            whole_model_method()
    with pytest.raises(CheckpointError, match="no place for"):
        engine.build(CONFIG, {"model.layers.9.mlp.up_proj.weight": weights[EMBED]}, dtype="float32", partial=True)


# ---------------------------------------------------------------------------------------------------------
# LayerStream over a checkpoint's files
# ---------------------------------------------------------------------------------------------------------
def test_layer_stream_gives_the_resident_logits(backend, teacher):
    folder, weights = teacher
    stream = LayerStream.open(folder, layers_per_group=4, backend=backend)
    assert stream.groups() == [range(0, 4), range(4, 6)]
    # in the tiny preset (vocabulary 261) a group of 4 blocks is the largest stage: those weights, in float32
    four_blocks = sum(weights[name].nbytes for name in weights if name.startswith(tuple(f"model.layers.{i}." for i in range(4))))
    assert stream.resident_bytes() == four_blocks > weights[EMBED].nbytes
    assert four_blocks < parameter_bytes(CONFIG, 4)
    engine = get_backend(backend)
    resident = engine.build(CONFIG, weights, dtype="float32")
    batches = [token_ids(CONFIG, batch=2, seq=SEQ, seed=1), token_ids(CONFIG, batch=1, seq=9, seed=2)]
    got: dict[int, list] = {0: [], 1: []}
    phases = []
    for index, start, logits in stream.logit_chunks(batches, chunk_tokens=8, phase=phases.append):
        got[index].append((start, logits))
    assert phases == ["embedding", "blocks 1-4 of 6", "blocks 5-6 of 6", "output head"]
    for index, ids in enumerate(batches):
        assert [start for start, _ in got[index]] == list(range(0, ids.shape[1], 8))
        joined = np.concatenate([logits for _, logits in got[index]], axis=1)
        assert relative_error(joined, engine.logits(resident, ids)) < 1e-5


def test_layer_stream_refuses_bad_settings_before_reading(teacher):
    with pytest.raises(ConfigError, match="--stream-layers must be a positive number of blocks"):
        LayerStream.open(teacher[0], layers_per_group=0, backend=BACKENDS[0] if BACKENDS else None)


@pytest.mark.skipif(not BACKENDS, reason="no backend installed")
def test_layer_stream_refuses_bad_ids_before_reading(teacher):
    stream = LayerStream.open(teacher[0], layers_per_group=2, backend=BACKENDS[0])
    with pytest.raises(InputError, match="token ids must lie in"):
        stream.logit_chunks([np.array([[0, CONFIG.vocab_size]])])


# ---------------------------------------------------------------------------------------------------------
# A teacher cache from a streamed teacher
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampled", [False, True])
def test_streamed_cache_equals_the_resident_one(backend, teacher, corpus, tmp_path, sampled):
    """The same ids, log-probs and tails, with 2 of the 6 blocks resident at a time (the sampled ids come
    from the same per-window streams read in the same order)."""
    options = {"backend": backend, "sampled": sampled}
    resident = shard_arrays(build(teacher[0], corpus, tmp_path / "resident", **options))
    streamed = shard_arrays(build(teacher[0], corpus, tmp_path / "streamed", stream_layers=2, **options))
    assert np.array_equal(streamed["windows"], resident["windows"])
    assert np.array_equal(streamed["ids"], resident["ids"])
    np.testing.assert_allclose(streamed["logprobs"], resident["logprobs"], atol=1e-5)
    np.testing.assert_allclose(streamed["tail"], resident["tail"], atol=1e-5)


def test_cli_stream_layers(teacher, corpus, tmp_path):
    if not BACKENDS:
        pytest.skip("no backend installed")
    out = tmp_path / "cache"
    args = ["distill", "cache", "--teacher", str(teacher[0]), "--data", str(corpus), "--out", str(out), "--top-k", "4",
            "--seq-len", "16", "--backend", BACKENDS[0], "--quiet"]
    assert_clean_failure(run_cli(*args, "--stream-layers", "0"), "--stream-layers must be a positive number of blocks")
    assert not out.exists()  # refused before anything was written
    done = run_cli(*args, "--stream-layers", "3")
    assert done.returncode == 0, done.stderr
    assert "the teacher streamed 3 blocks at a time" in done.stdout
    assert np.array_equal(shard_arrays(out)["ids"],
                          shard_arrays(build(teacher[0], corpus, tmp_path / "resident", top_k=4, backend=BACKENDS[0],
                                             shard_windows=256, temperature=1.0))["ids"])


# ---------------------------------------------------------------------------------------------------------
# Evaluation of a streamed model
# ---------------------------------------------------------------------------------------------------------
def test_streamed_perplexity_equals_the_resident_one(backend, teacher, corpus):
    import gemmalab
    from gemmalab.tokenizer import Tokenizer
    from gemmalab.train.evaluation import EvalPlan, perplexity, streamed_perplexity

    plan = EvalPlan(str(corpus), 16, "all")
    resident = perplexity(gemmalab.load(teacher[0], backend=backend), plan=plan, batch_size=3)
    streamed = streamed_perplexity(LayerStream.open(teacher[0], layers_per_group=4, backend=backend),
                                   Tokenizer.from_folder(teacher[0]), plan=plan, batch_size=3, chunk_tokens=7)
    assert streamed.tokens == resident.tokens == 8 * 16 and streamed.windows == resident.windows == 8
    assert abs(streamed.loss - resident.loss) <= 1e-5 * resident.loss


def test_cli_eval_stream_layers(teacher, corpus):
    if not BACKENDS:
        pytest.skip("no backend installed")
    args = ["eval", str(teacher[0]), "--data", str(corpus), "--seq-len", "16", "--backend", BACKENDS[0], "--json"]
    resident, streamed = run_cli(*args), run_cli(*args, "--stream-layers", "2")
    assert resident.returncode == 0 and streamed.returncode == 0, streamed.stderr
    a, b = (json.loads(result.stdout.strip().splitlines()[-1]) for result in (resident, streamed))
    assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"]
    assert_clean_failure(run_cli("eval", "tiny", "--stream-layers", "2"), "--stream-layers reads a checkpoint's files")
