"""The offline teacher cache: Backend.logit_chunks on every backend, the numpy sparse targets and their
estimators, the builder (against the numpy reference, killed and resumed, damaged and rebuilt), the reader
and its refusals, Batch.windows, and `gemmalab distill cache`.

Every expected value comes from an oracle written here: the float64 reference forward pass, a stable argsort
and log-softmax over the whole vocabulary, or a distribution over five words worked out by hand."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_clean_failure, run_cli, sigkill_when, snapshot
from conftest import BACKENDS, SHAPES, relative_error, token_ids
from safetensors.numpy import load_file

from gemmalab import checkpoint, reference
from gemmalab.backend import get_backend
from gemmalab.distill.cache import TeacherCache, build_cache, data_fingerprint
from gemmalab.distill.sparse import (
    SparseTargets,
    sampled_cross_entropy,
    sampled_targets,
    sparse_kl,
    top_k_targets,
    window_rng,
)
from gemmalab.errors import CheckpointError, ConfigError, InputError, OutputError
from gemmalab.params import init_weights
from gemmalab.tokenizer import Tokenizer
from gemmalab.train.data import DataStream, load_documents, pack

CONFIG = SHAPES["tiny"]
SEQ_LEN = 16
# 8 windows of SEQ_LEN + 1 byte-level tokens: <bos>, 134 bytes, <eos> = 136 = 8 x 17.
TEXT = ("Gemma distils into smaller students; a cache of its predictions lets them learn without it in memory. "
        "Top-k ids, log-probs and a tail.")[:134]
# The subprocess backend: torch starts fastest, else whatever is installed.
CLI_BACKEND = "torch" if "torch" in BACKENDS else (BACKENDS[0] if BACKENDS else None)
needs_backend = pytest.mark.skipif(CLI_BACKEND is None, reason="no backend installed")


# ---------------------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------------------
def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def oracle_top_k(logits: np.ndarray, k: int, temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, logprobs, tail) by a full stable sort of the whole vocabulary (ties to the smaller id)."""
    log_p = log_softmax(np.asarray(logits, np.float64) / temperature)
    ids = np.argsort(-log_p, axis=-1, kind="stable")[..., :k]
    kept = np.take_along_axis(log_p, ids, axis=-1)
    return ids, kept, 1.0 - np.exp(kept).sum(axis=-1)


def full_kl(teacher_logits: np.ndarray, student_logits: np.ndarray, temperature: float) -> np.ndarray:
    log_p, log_q = log_softmax(teacher_logits / temperature), log_softmax(student_logits / temperature)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


# ---------------------------------------------------------------------------------------------------------
# Fixtures: a tiny teacher checkpoint with its tokenizer, and a text of exactly 8 windows
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, dict]:
    """(checkpoint folder, its float32 weights): the tiny preset, weights with std 0.3 (std 0.02 would make
    every distribution nearly uniform), norms randomised, and the byte-level tokenizer beside them."""
    rng = np.random.default_rng(7)
    weights = init_weights(CONFIG, seed=3, std=0.3)
    weights = {name: (rng.normal(0.0, 0.3, w.shape).astype(np.float32) if name.endswith("norm.weight") else w)
               for name, w in weights.items()}
    # stored as float32 (the preset says bfloat16), so the teacher computes in float32 by default
    folder = checkpoint.save_checkpoint(tmp_path_factory.mktemp("teacher"), CONFIG.with_dtype("float32"), weights)
    Tokenizer.byte_level().save(folder)
    return folder, weights


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def packed(corpus: Path) -> tuple[np.ndarray, np.ndarray]:
    return pack(load_documents(corpus), Tokenizer.byte_level(), SEQ_LEN)


def shard_arrays(folder: Path) -> dict[str, np.ndarray]:
    """Every shard of a cache, loaded by safetensors itself and concatenated in window order."""
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = [load_file(folder / entry["file"]) for entry in manifest["shards"]]
    return {name: np.concatenate([s[name] for s in shards]) for name in ("ids", "logprobs", "tail", "windows")}


def build(teacher_folder: Path, corpus: Path, out: Path, **options) -> Path:
    settings = {"top_k": 8, "temperature": 2.0, "seq_len": SEQ_LEN, "batch_size": 4, "shard_windows": 3,
                "backend": CLI_BACKEND, "progress": False, "echo": lambda line: None, **options}
    return build_cache(teacher_folder, corpus, out, **settings)


@pytest.fixture(scope="module")
def built(teacher, corpus, tmp_path_factory) -> Path:
    """One finished top-8 cache (3 shards of 3, 3 and 2 windows), read by the tests that do not change it."""
    if CLI_BACKEND is None:
        pytest.skip("no backend installed")
    return build(teacher[0], corpus, tmp_path_factory.mktemp("built") / "cache")


# ---------------------------------------------------------------------------------------------------------
# Backend.logit_chunks
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["tiny", "untied-softcap"])
def test_logit_chunks_equal_logits_and_the_reference(backend, shape):
    config = SHAPES[shape]
    weights = init_weights(config, seed=1, std=0.3)
    engine = get_backend(backend)
    model = engine.build(config, weights, dtype="float32")
    ids = token_ids(config, batch=2, seq=21, seed=4)
    chunks = list(engine.logit_chunks(model, ids, chunk_tokens=8))
    assert [start for start, _ in chunks] == [0, 8, 16]
    assert [logits.shape for _, logits in chunks] == [(2, 8, config.vocab_size)] * 2 + [(2, 5, config.vocab_size)]
    assert all(logits.dtype == np.float32 for _, logits in chunks)
    joined = np.concatenate([logits for _, logits in chunks], axis=1)
    assert relative_error(joined, engine.logits(model, ids)) < 1e-6
    assert relative_error(joined, reference.forward(config, weights, ids)) < 1e-5
    (start, whole), = engine.logit_chunks(model, ids, chunk_tokens=64)  # one chunk when it covers the sequence
    assert start == 0 and relative_error(whole, joined) < 1e-6


def test_logit_chunks_refuse_bad_arguments_at_the_call(backend):
    engine = get_backend(backend)
    model = engine.build(CONFIG, init_weights(CONFIG, seed=1), dtype="float32")
    with pytest.raises(InputError, match="chunk_tokens must be a positive integer"):
        engine.logit_chunks(model, token_ids(CONFIG, batch=1, seq=4), chunk_tokens=0)  # not deferred to next()
    with pytest.raises(InputError, match="token ids must lie in"):
        engine.logit_chunks(model, np.array([[0, CONFIG.vocab_size]]), chunk_tokens=2)


# ---------------------------------------------------------------------------------------------------------
# The numpy targets and estimators
# ---------------------------------------------------------------------------------------------------------
# Five words with probabilities 0.4, 0.1, 0.3, 0.1, 0.1: ids 1, 3 and 4 tie.
FIVE = np.log(np.array([0.4, 0.1, 0.3, 0.1, 0.1]))


def test_top_k_on_five_words_by_hand():
    targets = top_k_targets(FIVE.astype(np.float32), 3, 1.0)
    assert targets.ids.tolist() == [0, 2, 1]  # by descending probability; of the three 0.1s, the smallest id
    np.testing.assert_allclose(targets.logprobs, np.log([0.4, 0.3, 0.1]), atol=1e-6)
    np.testing.assert_allclose(targets.tail, 0.2, atol=1e-6)  # the two 0.1s left out
    assert targets.ids.dtype == np.int32 and targets.logprobs.dtype == np.float32 and targets.tail.dtype == np.float32
    # At T = 2 each probability becomes sqrt(p) / (sqrt(.4) + sqrt(.3) + 3 sqrt(.1)).
    norm = np.sqrt(0.4) + np.sqrt(0.3) + 3 * np.sqrt(0.1)
    warm = top_k_targets(FIVE, 2, 2.0)
    assert warm.ids.tolist() == [0, 2]
    np.testing.assert_allclose(warm.logprobs, np.log([np.sqrt(0.4) / norm, np.sqrt(0.3) / norm]), atol=1e-6)
    np.testing.assert_allclose(warm.tail, 3 * np.sqrt(0.1) / norm, atol=1e-6)
    assert top_k_targets(FIVE, 5, 1.0).tail == 0.0  # nothing left out


def test_top_k_breaks_ties_at_the_boundary_by_the_smaller_id():
    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(size=(64, 300)), 1).astype(np.float32)  # rounded: many exact ties everywhere
    for k in (1, 5, 37, 300):
        targets = top_k_targets(logits, k, 1.3)
        ids, logprobs, tail = oracle_top_k(logits, k, 1.3)
        np.testing.assert_array_equal(targets.ids, ids)
        np.testing.assert_allclose(targets.logprobs, logprobs, atol=1e-6)
        np.testing.assert_allclose(targets.tail, np.clip(tail, 0, None), atol=1e-6)


def test_sparse_kl_on_five_words_by_hand():
    # Teacher kept ids 0 and 2 (p = .4 and .3, tail .3); a uniform student (q = .2 each, rest .6).
    targets = SparseTargets(np.array([0, 2], np.int32), np.log([0.4, 0.3]).astype(np.float32), np.float32(0.3))
    expected = 0.4 * np.log(0.4 / 0.2) + 0.3 * np.log(0.3 / 0.2) + 0.3 * np.log(0.3 / 0.6)
    np.testing.assert_allclose(sparse_kl(np.zeros(5), targets, 1.0), expected, rtol=1e-6)
    # A student at T = 2 with logits 2 log q' has q = q': the same buckets, the same value.
    q = np.array([0.1, 0.2, 0.3, 0.2, 0.2])
    expected = 0.4 * np.log(0.4 / 0.1) + 0.3 * np.log(0.3 / 0.3) + 0.3 * np.log(0.3 / 0.6)
    np.testing.assert_allclose(sparse_kl(2 * np.log(q), targets, 2.0), expected, rtol=1e-6)
    # No tail (0 log 0 = 0): only the kept ids count.
    whole = SparseTargets(np.array([0, 1], np.int32), np.log([0.75, 0.25]).astype(np.float32), np.float32(0.0))
    expected = 0.75 * np.log(0.75 / 0.2) + 0.25 * np.log(0.25 / 0.2)
    np.testing.assert_allclose(sparse_kl(np.zeros(5), whole, 1.0), expected, rtol=1e-6)


def test_sparse_kl_with_the_whole_vocabulary_is_the_full_kl():
    rng = np.random.default_rng(1)
    teacher_logits = rng.normal(0, 2, size=(3, 4, 50)).astype(np.float32)
    student_logits = rng.normal(0, 2, size=(3, 4, 50))
    for temperature in (1.0, 2.5):
        targets = top_k_targets(teacher_logits, 50, temperature)
        kl = sparse_kl(student_logits, targets, temperature)
        assert kl.shape == (3, 4)
        np.testing.assert_allclose(kl, full_kl(teacher_logits, student_logits, temperature), atol=1e-6)
        # Fewer buckets: never more than the full KL (lumping loses information).
        assert (sparse_kl(student_logits, top_k_targets(teacher_logits, 5, temperature), temperature)
                <= kl + 1e-6).all()


def test_sampled_cross_entropy_on_five_words_by_hand():
    q = np.array([0.1, 0.2, 0.3, 0.2, 0.2])
    targets = SparseTargets(np.array([0, 0, 3], np.int32), np.log([0.4, 0.4, 0.1]).astype(np.float32),
                            np.float32(np.nan))
    expected = -(2 * np.log(0.1) + np.log(0.2)) / 3
    np.testing.assert_allclose(sampled_cross_entropy(np.log(q), targets, 1.0), expected, rtol=1e-6)
    np.testing.assert_allclose(sampled_cross_entropy(3 * np.log(q), targets, 3.0), expected, rtol=1e-6)
    with pytest.raises(InputError, match="no tail mass"):
        sparse_kl(np.log(q), targets, 1.0)


def test_the_sampled_estimate_is_unbiased():
    teacher_logits = np.array([2.0, 0.5, 1.5, -1.0, 0.0])
    student_logits = np.array([0.3, 1.0, -0.5, 0.2, 0.8])
    for temperature in (1.0, 1.7):
        p = np.exp(log_softmax(teacher_logits / temperature))
        cross_entropy = -(p * log_softmax(student_logits / temperature)).sum()  # H(p_teacher, p_student)
        estimates = np.array([
            sampled_cross_entropy(student_logits, sampled_targets(teacher_logits, 4, temperature, window_rng(seed, 0)),
                                  temperature)
            for seed in range(3000)
        ])
        standard_error = estimates.std(ddof=1) / np.sqrt(len(estimates))
        assert abs(estimates.mean() - cross_entropy) < 4 * standard_error, (estimates.mean(), cross_entropy)
        assert standard_error < 0.02  # the test has power: a bias of 0.1 would fail it


def test_sampled_ids_come_from_the_seed_and_window_alone():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, size=(12, 40)).astype(np.float32)
    first = sampled_targets(logits, 6, 1.5, window_rng(5, 17))
    again = sampled_targets(logits, 6, 1.5, window_rng(5, 17))
    np.testing.assert_array_equal(first.ids, again.ids)
    assert not np.array_equal(first.ids, sampled_targets(logits, 6, 1.5, window_rng(5, 18)).ids)
    assert not np.array_equal(first.ids, sampled_targets(logits, 6, 1.5, window_rng(6, 17)).ids)
    stream = window_rng(5, 17)  # in consecutive chunks of positions from one stream: the same ids
    chunked = [sampled_targets(logits[a:b], 6, 1.5, stream) for a, b in ((0, 5), (5, 11), (11, 12))]
    np.testing.assert_array_equal(np.concatenate([c.ids for c in chunked]), first.ids)
    np.testing.assert_allclose(first.logprobs, np.take_along_axis(log_softmax(logits / 1.5), first.ids, -1), atol=1e-6)
    assert first.sampled and np.isnan(first.tail).all() and first.tail.shape == (12,)


# ---------------------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------------------
def test_build_equals_the_reference_top_k(backend, teacher, corpus, tmp_path):
    folder, weights = teacher
    out = build_cache(folder, corpus, tmp_path / "cache", top_k=8, temperature=2.0, seq_len=SEQ_LEN, batch_size=4,
                      shard_windows=4, chunk_tokens=24, backend=backend, progress=False, echo=lambda line: None)
    windows, trained = packed(corpus)
    assert len(windows) == 8
    arrays = shard_arrays(out)
    np.testing.assert_array_equal(arrays["windows"], np.arange(8))
    assert arrays["ids"].shape == (8, SEQ_LEN, 8) and arrays["tail"].shape == (8, SEQ_LEN)
    logits = reference.forward(CONFIG, weights, windows[:, :-1])  # float64 [8, 16, vocab]: make_batch's inputs
    ids, logprobs, tail = oracle_top_k(logits, 8, 2.0)
    np.testing.assert_allclose(arrays["logprobs"], logprobs, atol=1e-4)
    np.testing.assert_allclose(arrays["tail"], tail, atol=1e-4)
    # Ids exactly, except where two of the reference's top-9 logits lie within float32 noise of each other.
    scaled = np.sort(logits / 2.0, axis=-1)[..., ::-1][..., :9]
    clear = (np.diff(-scaled, axis=-1) > 1e-4).all(axis=-1)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(arrays["ids"][clear], ids[clear])
    log_p = log_softmax(logits / 2.0)  # elsewhere each id has the probability it is stored with
    np.testing.assert_allclose(np.take_along_axis(log_p, arrays["ids"].astype(np.int64), -1), arrays["logprobs"], atol=1e-4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"] == {"source": str(corpus.resolve()), "windows": 8,
                                "fingerprint": data_fingerprint(windows, trained, SEQ_LEN)}
    assert manifest["tokenizer"]["fingerprint"] == Tokenizer.byte_level().fingerprint
    assert manifest["teacher"]["vocab_size"] == CONFIG.vocab_size
    assert manifest["settings"] == {"top_k": 8, "mode": "top-k", "temperature": 2.0, "seq_len": SEQ_LEN, "seed": 0,
                                    "dtype": "float32", "shard_windows": 4}
    assert [(s["file"], s["first_window"], s["windows"]) for s in manifest["shards"]] == [
        ("shard-00000.safetensors", 0, 4), ("shard-00001.safetensors", 4, 4)]


@needs_backend
def test_sampled_build_is_reproducible_and_holds_teacher_logprobs(teacher, corpus, tmp_path):
    folder, weights = teacher
    first = build(folder, corpus, tmp_path / "a", sampled=True, seed=11, batch_size=3, chunk_tokens=15)
    again = build(folder, corpus, tmp_path / "b", sampled=True, seed=11, batch_size=8)  # other batches and chunks
    arrays = shard_arrays(first)
    np.testing.assert_array_equal(arrays["ids"], shard_arrays(again)["ids"])
    assert np.isnan(arrays["tail"]).all()
    windows, _ = packed(corpus)
    log_p = log_softmax(reference.forward(CONFIG, weights, windows[:, :-1]) / 2.0)
    np.testing.assert_allclose(np.take_along_axis(log_p, arrays["ids"].astype(np.int64), -1), arrays["logprobs"], atol=1e-4)
    other = shard_arrays(build(folder, corpus, tmp_path / "c", sampled=True, seed=12))["ids"]
    assert not np.array_equal(other, arrays["ids"])


KILLED_RUN = textwrap.dedent("""
    # `gemmalab ARGS`, except that the build stops for good inside its second shard, a half-written
    # temporary file on disk, so the test can kill it there.
    import sys, time
    from gemmalab.distill import cache
    write_shard = cache.write_shard
    def write_or_hang(path, targets, windows):
        if path.name != "shard-00000.safetensors":
            (path.parent / f".{path.name}.killed.tmp").write_bytes(b"half a shard")
            time.sleep(600)
        return write_shard(path, targets, windows)
    cache.write_shard = write_or_hang
    from gemmalab.cli import main
    main(sys.argv[1:])
""")


def cli_args(teacher_folder: Path, corpus: Path, out: Path) -> list[str]:
    return ["distill", "cache", "--teacher", str(teacher_folder), "--data", str(corpus), "--out", str(out),
            "--top-k", "8", "--temperature", "2.0", "--seq-len", str(SEQ_LEN), "--batch-size", "4",
            "--shard-windows", "3", "--backend", CLI_BACKEND, "-q"]


@needs_backend
def test_a_killed_build_resumes_to_the_same_files(teacher, corpus, built, tmp_path):
    out = tmp_path / "killed"
    driver = tmp_path / "killed_run.py"
    driver.write_text(KILLED_RUN)
    sigkill_when([sys.executable, str(driver), *cli_args(teacher[0], corpus, out)],
                 lambda: bool(list(out.glob(".shard-00001.safetensors.*.tmp"))), "its second shard")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors"]
    with pytest.raises(CheckpointError, match="incomplete \\(1 of 3 shards\\).*--out .*killed"):
        TeacherCache.open(out)

    result = run_cli(*cli_args(teacher[0], corpus, out), timeout=300)  # the same command: it resumes
    assert result.returncode == 0, result.stderr
    assert "shard-00001.safetensors: windows 3-5 (2 of 3 shards)" in result.stdout
    assert "8 windows of 16 positions in 3 shards" in result.stdout
    assert not list(out.glob(".*.tmp"))  # the half-written file is gone
    assert snapshot(out) == snapshot(built)  # byte for byte the uninterrupted build (made in-process)

    lines = []
    build(teacher[0], corpus, out, echo=lines.append)  # once more: complete, nothing to do, nothing touched
    assert lines == [f"teacher cache {out} is complete (8 windows in 3 shards): nothing to do"]
    assert snapshot(out) == snapshot(built)


@needs_backend
def test_a_damaged_shard_is_refused_then_rebuilt(teacher, corpus, built, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(built, out)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the last window's tail
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as refused:
        TeacherCache.open(out)
    message = str(refused.value)
    assert "\n" not in message and "shard-00001.safetensors is damaged" in message
    assert f"rebuild it with gemmalab distill cache --teacher {teacher[0]}" in message and f"--out {out}" in message
    (out / "shard-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard shard-00002.safetensors is missing; rebuild it with"):
        TeacherCache.open(out, verify=False)  # without reading the shards: only whether they are there
    lines = []
    build(teacher[0], corpus, out, echo=lines.append)
    assert "shard shard-00001.safetensors is damaged (its sha256 does not match the manifest's): rebuilding it" in lines
    assert "shard shard-00002.safetensors is missing: rebuilding it" in lines
    assert snapshot(out) == snapshot(built)


@needs_backend
def test_a_resume_with_other_settings_or_data_is_refused(teacher, corpus, built, tmp_path):
    before = snapshot(built)
    with pytest.raises(ConfigError) as refused:
        build(teacher[0], corpus, built, top_k=4, temperature=1.0)
    message = str(refused.value)
    assert "\n" not in message and "top_k 8 there, 4 now; temperature 2.0 there, 1.0 now" in message
    assert "choose another --out" in message
    other = tmp_path / "other.txt"
    other.write_text(TEXT[::-1], encoding="utf-8")
    with pytest.raises(ConfigError, match="data fingerprint [0-9a-f]{16} there, [0-9a-f]{16} now"):
        build(teacher[0], other, built)
    assert snapshot(built) == before


@needs_backend
def test_builds_that_cannot_work_are_refused_before_writing(teacher, corpus, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(teacher[0], bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="has no tokenizer.json or tokenizer.model"):
        build(bare, corpus, tmp_path / "cache")
    with pytest.raises(ConfigError, match="--top-k 300 is more than the teacher's vocabulary of 261 ids"):
        build(teacher[0], corpus, tmp_path / "cache", top_k=300)
    with pytest.raises(ConfigError, match="--temperature must be a positive number, got 0.0"):
        build(teacher[0], corpus, tmp_path / "cache", temperature=0.0)
    assert not (tmp_path / "cache").exists()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds files \\(notes.txt\\) but no teacher cache manifest"):
        build(teacher[0], corpus, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------------------
# The reader
# ---------------------------------------------------------------------------------------------------------
def test_targets_are_gathered_across_shards(built):
    cache = TeacherCache.open(built)
    arrays = shard_arrays(built)
    picked = [7, 0, 4, 4, 2]  # shards 2, 0, 1, 1, 0; a repeat
    targets = cache.targets(np.array(picked))
    assert targets.ids.shape == (5, SEQ_LEN, 8) and targets.ids.dtype == np.int32
    np.testing.assert_array_equal(targets.ids, arrays["ids"][picked])
    np.testing.assert_array_equal(targets.logprobs, arrays["logprobs"][picked])
    np.testing.assert_array_equal(targets.tail, arrays["tail"][picked])
    assert (cache.windows, cache.seq_len, cache.top_k, cache.temperature, cache.sampled) == (8, SEQ_LEN, 8, 2.0, False)
    with pytest.raises(InputError, match="window indices must be integers in \\[0, 8\\)"):
        cache.targets([8])


def test_a_cache_for_another_run_is_refused_in_one_line(built, corpus):
    cache = TeacherCache.open(built)
    windows, trained = packed(corpus)
    ours = data_fingerprint(windows, trained, SEQ_LEN)
    cache.check(tokenizer_fingerprint=Tokenizer.byte_level().fingerprint, data_fingerprint=ours,
                vocab_size=CONFIG.vocab_size)  # its own run: accepted
    theirs = data_fingerprint(windows[:-1], trained[:-1], SEQ_LEN)
    refusals = [
        ({"data_fingerprint": theirs}, ["other data", ours, theirs]),
        ({"tokenizer_fingerprint": "0123456789abcdef"}, ["another tokenizer", Tokenizer.byte_level().fingerprint,
                                                         "0123456789abcdef"]),
        ({"vocab_size": 262144}, ["vocabulary of 261 ids", "262144"]),
    ]
    for given, fragments in refusals:
        with pytest.raises(ConfigError) as refused:
            cache.check(**given)
        message = str(refused.value)
        assert "\n" not in message
        for fragment in fragments:
            assert fragment in message, (fragment, message)


def test_a_missing_or_unreadable_manifest_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="is not a teacher cache \\(no manifest.json\\)"):
        TeacherCache.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json is unreadable"):
        TeacherCache.open(tmp_path)


def test_batches_name_the_packed_windows_they_came_from(corpus):
    windows, trained = packed(corpus)
    stream = DataStream(windows, trained, seed=3, eval_fraction=0.25)
    seen = []
    for _ in range(5):
        batch = stream.next_batch(3)
        assert batch.windows.dtype == np.int64
        np.testing.assert_array_equal(batch.inputs, windows[batch.windows, :-1])
        np.testing.assert_array_equal(batch.targets, windows[batch.windows, 1:])
        seen += batch.windows.tolist()
    held_out = [i for b in stream.eval_batches(1) for i in b.windows.tolist()]
    for b in stream.eval_batches(2):
        np.testing.assert_array_equal(b.inputs, windows[b.windows, :-1])
    assert len(held_out) == 2 and not set(held_out) & set(seen)
    assert sorted(set(seen) | set(held_out)) == list(range(8))


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------
@needs_backend
def test_cli_bad_input_is_one_line(teacher, corpus, tmp_path):
    out = tmp_path / "cache"
    args = cli_args(teacher[0], corpus, out)
    result = run_cli(*[("0" if a == "8" and args[i - 1] == "--top-k" else a) for i, a in enumerate(args)])
    assert_clean_failure(result, "--top-k must be a positive integer, got 0")
    assert not out.exists()
