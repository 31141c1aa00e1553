"""Whole training runs on every backend: the tiny preset learns the embedded corpus, a run killed with
SIGKILL resumes to the very same losses, a run resumed on another backend gives the losses of its writer's
uninterrupted run, a non-finite loss stops the run and keeps the last good checkpoint, and `gemmalab train` /
`gemmalab eval` work from the command line."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from train_oracles import naive_loss_sum

import gemmalab
from gemmalab import reference
from gemmalab.backend import get_backend
from gemmalab.errors import TrainingError
from gemmalab.train import TrainConfig, checkpoints, train

SMALL = {"seq_len": 64, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_fraction": 0.02, "eval_batches": 2,
         "log_every": 1}


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_tiny_model_learns_the_embedded_corpus(backend, tmp_path):
    config = TrainConfig(backend=backend, steps=120, out=str(tmp_path / "run"), **SMALL, tensorboard=False)
    result = train(config, progress=False)
    first = result.history[0]["loss"]
    assert first == pytest.approx(math.log(261), abs=0.3)  # random init: about uniform over 261 byte ids
    assert result.eval_loss < 0.6 * first  # a real drop on text the run never trained on


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmalab", *args], capture_output=True, text=True, **kwargs)


def test_sigkilled_run_resumes_to_identical_losses(backend, tmp_path):
    common = ["--steps", "16", "--backend", backend, "--seq-len", "64", "--batch-size", "4", "--lr", "3e-3",
              "--checkpoint-every", "3", "-q", "--set", "warmup_steps=2", "--set", "tensorboard=false", "--log-every", "1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = _cli("train", *common, "--out", str(whole))
    assert done.returncode == 0, done.stderr
    process = subprocess.Popen([sys.executable, "-m", "gemmalab", "train", *common, "--out", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        logged = losses(killed) if (killed / "metrics.jsonl").exists() else {}
        if max(logged, default=0) >= 8:  # past the checkpoint of step 6, before the end
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed_from = checkpoints.latest(killed)
    assert resumed_from is not None and checkpoints.read_state(resumed_from)["step"] < 16
    again = _cli("train", "--out", str(killed), "--resume", "-q")  # the run's own settings come from its checkpoint
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout
    assert losses(killed) == losses(whole)  # every step, bit for bit
    assert sorted(losses(killed)) == list(range(1, 17))


def _ring(names: list[str]) -> list[tuple[str, str]]:
    """Each backend once as the writer and once as the reader (every ordered pair with two backends); the
    trainer conformance tests (test_train_backends.py) cover every ordered pair on a single step."""
    return [(name, names[(i + 1) % len(names)]) for i, name in enumerate(names)] if len(names) > 1 else []


@pytest.mark.parametrize(("writer", "reader"), _ring(gemmalab.backends())
                         or [pytest.param(None, None, marks=pytest.mark.skip("needs two backends"))])
def test_a_run_resumed_on_another_backend_gives_the_writers_losses(writer, reader, tmp_path):
    # The oracle is the writer's own uninterrupted run: 6 steps with a checkpoint at 3. Its final checkpoint is
    # then removed, as if the run had been killed before it, and the run resumed on the reader from step 3.
    settings = {**SMALL, "steps": 6, "checkpoint_every": 3, "out": str(tmp_path), "tensorboard": False}
    train(TrainConfig(backend=writer, **settings), progress=False)
    whole = losses(tmp_path)
    shutil.rmtree(checkpoints.latest(tmp_path))
    said = []
    train(TrainConfig(backend=reader, resume=True, **settings), progress=False, echo=said.append)
    assert any(f"written by the {writer} backend: going on with {reader}" in line for line in said), said
    moved = losses(tmp_path)
    assert sorted(moved) == list(range(1, 7)) and all(moved[step] == whole[step] for step in (1, 2, 3))
    for step in (4, 5, 6):  # measured: within 1e-6 on every ordered pair; a wrong step count or moment is far more
        assert moved[step] == pytest.approx(whole[step], rel=1e-5), step
    # each checkpoint records the backend that wrote it
    assert [checkpoints.read_state(p)["backend"] for p in checkpoints.complete_checkpoints(tmp_path)] == [writer, reader]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(backend, tmp_path, monkeypatch):
    # Fault injection: the backend's real trainer, with one micro-batch's loss turned into NaN at step 7.
    real = get_backend(backend)
    make_trainer = real.trainer
    calls = {"n": 0}

    def trainer_with_a_fault(model, spec, **kwargs):
        inner = make_trainer(model, spec, **kwargs)
        accumulate = inner.accumulate

        def faulty(*args, **kwargs):
            calls["n"] += 1
            value = accumulate(*args, **kwargs)
            return float("nan") if calls["n"] == 7 else value

        inner.accumulate = faulty
        return inner

    monkeypatch.setattr(real, "trainer", trainer_with_a_fault)
    config = TrainConfig(backend=backend, steps=10, checkpoint_every=5, out=str(tmp_path), tensorboard=False, **SMALL)
    with pytest.raises(TrainingError, match=r"loss became nan at step 7.*step-00000005"):
        train(config, progress=False)
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path)] == ["step-00000005"]
    assert max(losses(tmp_path)) == 6


def test_a_finished_run_is_not_overwritten(tmp_path):
    config = TrainConfig(steps=2, out=str(tmp_path), tensorboard=False, **SMALL)
    train(config, progress=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    result = _cli("train", "--steps", "2", "--out", str(tmp_path), "-q")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "already holds a run" in result.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_cli_eval_reports_the_reference_perplexity(backend, tmp_path):
    run = tmp_path / "run"
    trained = _cli("train", "--steps", "3", "--backend", backend, "--out", str(run), "--seq-len", "32", "-q",
                   "--set", "tensorboard=false")
    assert trained.returncode == 0, trained.stderr
    folder = checkpoints.latest(run)
    data = tmp_path / "eval.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    result = _cli("eval", str(folder), "--data", str(data), "--seq-len", "24", "--backend", backend, "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    # oracle: the float64 reference model on the same windows, packed by hand here
    model = gemmalab.load(folder, backend="torch" if "torch" in gemmalab.backends() else backend)
    weights = model.weights()
    ids = [2, *(b + 5 for b in data.read_bytes()), 1]
    width = 25
    windows = np.array([ids[i : i + width] for i in range(0, len(ids) - width + 1, width)])
    logits = reference.forward(model.config, weights, windows[:, :-1])
    expected = naive_loss_sum(logits, windows[:, 1:], np.ones(windows[:, 1:].shape)) / windows[:, 1:].size
    assert got["loss"] == pytest.approx(expected, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert got["tokens"] == windows[:, 1:].size and got["tokens_per_s"] > 0


def test_fp16_loss_scaling_skips_overflowing_steps_and_halves_the_scale(backend, tmp_path):
    config = TrainConfig(backend=backend, steps=12, out=str(tmp_path), precision="fp16", loss_scale=2.0**24,
                         tensorboard=False, **SMALL)
    result = train(config, progress=False)
    records = [r for r in result.history if "loss" in r]
    skipped = [r["step"] for r in records if r["skipped"]]
    assert skipped, "a 2**24 loss scale overflows fp16 gradients: some step must have been skipped"
    # the rule: halve on every skipped step (no growth within 2000 good steps)
    assert records[-1]["loss_scale"] == 2.0**24 / 2 ** len(skipped)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]


def test_progressive_unfreezing_trains_the_top_blocks_first(backend, tmp_path):
    # 6 blocks, two more every 2 steps: after 2 steps only blocks 4-5 (and the final norm) have moved
    config = TrainConfig(backend=backend, steps=2, out=str(tmp_path / "a"), unfreeze_every=2, unfreeze_blocks=2,
                         tensorboard=False, **SMALL)
    start = gemmalab.init("tiny", backend="torch" if "torch" in gemmalab.backends() else backend).weights()
    after = gemmalab.load(train(config, progress=False).checkpoint, backend=backend).weights()
    moved = {name for name in start if not np.array_equal(start[name], after[name])}
    blocks = {int(name.split(".")[2]) for name in moved if name.startswith("model.layers.")}
    assert blocks == {4, 5} and "model.norm.weight" in moved and "model.embed_tokens.weight" not in moved


def test_fine_tuning_a_checkpoint_on_chat_data(backend, tmp_path):
    base = train(TrainConfig(backend=backend, steps=2, out=str(tmp_path / "base"), tensorboard=False, **SMALL),
                 progress=False).checkpoint
    chats = tmp_path / "chats.jsonl"
    line = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."}]}
    chats.write_text("\n".join(json.dumps(line) for _ in range(40)) + "\n")
    result = _cli("train", "--model", str(base), "--data", str(chats), "--steps", "3", "--seq-len", "32",
                  "--batch-size", "2", "--backend", backend, "--out", str(tmp_path / "chat"), "-q", "--log-every", "1",
                  "--set", "tensorboard=false", "--set", "eval_fraction=0.1")
    assert result.returncode == 0, result.stderr
    records = losses(tmp_path / "chat")
    assert sorted(records) == [1, 2, 3] and all(math.isfinite(v) for v in records.values())
    tuned = checkpoints.latest(tmp_path / "chat")
    assert (tuned / "tokenizer.json").is_file() and gemmalab.load(tuned, backend=backend).tokenizer.vocab_size == 261
