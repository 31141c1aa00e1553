"""Distillation runs (gemmalab.distill): the config and its YAML sections, a whole run on every backend whose
held-out figures equal the numpy reference's on the run's own checkpoints, the refusals (another tokenizer,
another objective on --resume), and `gemmalab distill` from the command line.

The loss terms themselves (each divergence, the shared vocabulary, value and gradient on every backend) are
tests/test_train_distill.py's; here the oracle is reference.forward in float64 on the saved teacher and
student, over the held-out windows the run's own data stream holds out."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_clean_failure, run_cli, snapshot

from gemmalab import checkpoint, reference
from gemmalab.distill import DistillConfig, distill
from gemmalab.distill.run import CURVES_FILE, REPORT_FILE
from gemmalab.errors import ConfigError, TrainingError
from gemmalab.tokenizer import Tokenizer
from gemmalab.train import TrainConfig, train
from gemmalab.train.data import DataStream, load_documents, pack

SMALL = {"seq_len": 32, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "eval_fraction": 0.05, "eval_batches": 1,
         "log_every": 1, "tensorboard": False, "aim": False}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny teacher checkpoint (with its byte-level tokenizer), trained a few steps on the embedded corpus."""
    out = tmp_path_factory.mktemp("teacher")
    result = train(TrainConfig(preset="tiny", steps=4, out=str(out), backend="torch", **SMALL), progress=False,
                   echo=lambda _: None)
    return result.checkpoint


# --- the config ---------------------------------------------------------------------------------------------
def test_sections_flat_keys_and_dotted_sets_give_one_config(tmp_path, teacher):
    sections = tmp_path / "distill.yaml"
    sections.write_text(f"teacher: {{model: {teacher}, dtype: bfloat16}}\nstudent: {{preset: tiny}}\n"
                        "training: {steps: 7, lr: 1.0e-3}\ndistillation: {loss: jsd, beta: 0.25, alpha: 0.2}\n")
    flat = DistillConfig.from_dict({"teacher": str(teacher), "teacher_dtype": "bfloat16", "preset": "tiny", "steps": 7,
                                    "lr": 1e-3, "loss": "jsd", "beta": 0.25, "alpha": 0.2})
    assert DistillConfig.from_sources(sections) == flat
    moved = DistillConfig.from_sources(sections, ["distillation.alpha=0.7", "temperature=3", "teacher.dtype=float32"])
    assert (moved.alpha, moved.temperature, moved.teacher_dtype) == (0.7, 3.0, "float32")
    # the objective is the loss spec: alpha on the hard labels, 1 - alpha on the divergence
    ce, kd = flat.train_spec().loss.head
    assert (ce.weight, kd.weight, kd.divergence, kd.beta) == (0.2, 0.8, "jsd", 0.25)


@pytest.mark.parametrize(("values", "message"), [
    ({}, "needs a teacher"),
    ({"teacher": "t", "loss": "kl"}, "fkl, rkl, jsd, tvd"),
    ({"teacher": "t", "alpha": 1.5}, "alpha must be in [0, 1]"),
    ({"teacher": "t", "temperature": 0}, "temperature must be positive"),
    ({"teacher": "t", "temperature_schedule": "step"}, "constant, linear, cosine"),
    ({"teacher": "t", "alhpa": 0.1}, "did you mean alpha"),
])
def test_a_bad_setting_is_one_line_naming_it(values, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DistillConfig.from_dict(values)


def test_a_section_key_it_does_not_have_is_refused():
    with pytest.raises(ConfigError, match="the distillation section has no setting 'lr'"):
        DistillConfig.flatten({"distillation": {"lr": 1.0}})


def test_a_scheduled_temperature_reaches_the_loss_as_a_per_step_scalar(teacher):
    constant = DistillConfig(teacher=str(teacher), temperature=2.0)
    assert constant.train_spec().loss.scalars == ()
    cosine = DistillConfig(teacher=str(teacher), temperature=4.0, temperature_end=1.0, temperature_schedule="cosine")
    assert cosine.train_spec().loss.scalars == ("temperature",)


# --- whole runs -----------------------------------------------------------------------------------------------
def held_out(config: DistillConfig, tokenizer: Tokenizer):
    """The run's held-out windows, rebuilt from its data, seed and split (the batches its evaluation reads)."""
    windows, trained = pack(load_documents(config.data), tokenizer, config.seq_len)
    stream = DataStream(windows, trained, seed=config.seed, eval_fraction=config.eval_fraction)
    return list(stream.eval_batches(config.batch_size, config.eval_batches))


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_a_distillation_run_reports_the_reference_figures(backend, tmp_path, teacher):
    config = DistillConfig(teacher=str(teacher), preset="tiny", steps=3, backend=backend, out=str(tmp_path / "kd"),
                           loss="fkl", alpha=0.5, temperature=2.0, **SMALL)
    result = distill(config, progress=False, echo=lambda _: None)
    report = json.loads((tmp_path / "kd" / REPORT_FILE).read_text())
    assert report == json.loads(json.dumps(result.report))
    assert (tmp_path / "kd" / CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["settings"]["loss"] == "fkl" and report["steps"] == 3

    # the oracle: both saved checkpoints through the float64 reference, on the held-out windows
    student_folder = Path(report["checkpoint"])
    models = {}
    for name, folder in (("teacher", teacher), ("student", student_folder)):
        cfg = checkpoint.load_config(folder)
        models[name] = (cfg, checkpoint.read_weights(folder, cfg))
    nll = {"teacher": 0.0, "student": 0.0}
    agree = kl = tokens = 0.0
    for batch in held_out(config, Tokenizer.from_folder(teacher)):
        logits = {name: reference.forward(cfg, weights, batch.inputs) for name, (cfg, weights) in models.items()}
        w = batch.weights.astype(np.float64)
        for name, z in logits.items():
            nll[name] += float((w * -np.take_along_axis(log_softmax(z), batch.targets[..., None], -1)[..., 0]).sum())
        log_t, log_s = log_softmax(logits["teacher"]), log_softmax(logits["student"])
        kl += float((w * (np.exp(log_t) * (log_t - log_s)).sum(-1)).sum())
        agree += float((w * (logits["teacher"].argmax(-1) == logits["student"].argmax(-1))).sum())
        tokens += float(w.sum())
    tolerance = {"rel": 2e-4, "abs": 1e-5}
    assert report["student_perplexity"] == pytest.approx(math.exp(nll["student"] / tokens), **tolerance)
    assert report["teacher_perplexity"] == pytest.approx(math.exp(nll["teacher"] / tokens), **tolerance)
    assert report["kl"] == pytest.approx(kl / tokens, **tolerance)
    assert report["top1_agreement"] == pytest.approx(agree / tokens, abs=1.5 / tokens)  # one tie may flip

    # every step logs each loss component; the total is their weighted sum
    records = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/distillation" in r]
    assert len(steps) == 3
    for r in steps:
        assert r["loss"] == pytest.approx(0.5 * r["loss/cross_entropy"] + 0.5 * r["loss/distillation"], rel=1e-5)


def test_resume_refuses_another_objective_and_continues_the_same_one(tmp_path, teacher):
    settings = dict(teacher=str(teacher), preset="tiny", backend="torch", out=str(tmp_path / "kd"), **SMALL)
    distill(DistillConfig(steps=2, **settings), progress=False, echo=lambda _: None)
    before = snapshot(tmp_path / "kd")
    with pytest.raises(TrainingError, match=r"--resume cannot change alpha \(the run has 0.5, this command 0.9\)"):
        distill(DistillConfig(steps=2, alpha=0.9, resume=True, **settings), progress=False, echo=lambda _: None)
    assert snapshot(tmp_path / "kd") == before
    extended = distill(DistillConfig(steps=3, resume=True, extend=True, **settings), progress=False, echo=lambda _: None)
    assert extended.train.steps == 3 and extended.report["steps"] == 3


def test_a_student_with_another_tokenizer_is_refused_naming_both(tmp_path, teacher):
    student = tmp_path / "student"
    shutil.copytree(teacher, student)
    data = json.loads((student / "tokenizer.json").read_text())
    data.setdefault("added_tokens", []).append(
        {"id": 260, "content": "<other>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True})
    (student / "tokenizer.json").write_text(json.dumps(data))
    config = DistillConfig(teacher=str(teacher), model=str(student), steps=1, out=str(tmp_path / "kd"), **SMALL)
    with pytest.raises(ConfigError, match=f"teacher {teacher} and the student {student} have different tokenizers"):
        distill(config, progress=False, echo=lambda _: None)
    assert not (tmp_path / "kd").exists()


# --- the command line -------------------------------------------------------------------------------------------
def test_the_cli_distils_and_prints_the_report(tmp_path, teacher):
    out = tmp_path / "kd"
    result = run_cli("distill", "--teacher", str(teacher), "--student", "tiny", "--steps", "2", "--seq-len", "32",
                     "--batch-size", "2", "--loss", "tvd", "--alpha", "0.3", "--backend", "torch", "--out", str(out),
                     "--set", "eval_batches=1", "--set", "tensorboard=false")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["settings"]["loss"] == "tvd" and report["settings"]["alpha"] == 0.3
    assert "student_perplexity" in result.stdout and str(out / REPORT_FILE) in result.stdout
    listed = run_cli("distill", "--list-settings")
    assert listed.returncode == 0 and "temperature_schedule" in listed.stdout
    assert_clean_failure(run_cli("distill", "--teacher", str(teacher), "--loss", "kl", "--out", str(tmp_path / "x")),
                         "loss 'kl' is not one of fkl, rkl, jsd, tvd")


# --- from an offline teacher cache ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    """About 40 windows of 32 tokens: a cache of it builds in a second."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(f"word{i % 37} and line {i}." for i in range(160)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cache(teacher, small_text, tmp_path_factory) -> Path:
    from gemmalab.distill.cache import build_cache

    return build_cache(teacher, small_text, tmp_path_factory.mktemp("cache") / "c", top_k=8, temperature=1.0,
                       seq_len=SMALL["seq_len"], batch_size=4, shard_windows=16, backend="torch", progress=False,
                       echo=lambda _: None)


def test_a_run_from_a_teacher_cache_needs_no_teacher_and_reports_the_cache_figures(backend, tmp_path, cache, small_text):
    from gemmalab.distill.cache_format import TeacherCache

    config = DistillConfig(cache=str(cache), preset="tiny", data=str(small_text), steps=2, backend=backend,
                           out=str(tmp_path / "kd"), temperature=1.0, **SMALL)
    result = distill(config, progress=False, echo=lambda _: None)
    report = result.report
    assert report["teacher_perplexity"] is None  # the teacher was never loaded
    records = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/cached_distillation" in r for r in records if "loss" in r and r["step"] <= 2)

    # the oracle: the saved student through the reference, against the cache's ids on the held-out windows
    folder = Path(report["checkpoint"])
    cfg = checkpoint.load_config(folder)
    weights = checkpoint.read_weights(folder, cfg)
    stored = TeacherCache.open(cache)
    agree = kl = tokens = 0.0
    for batch in held_out(config, Tokenizer.byte_level()):
        log_q = log_softmax(reference.forward(cfg, weights, batch.inputs))
        targets = stored.targets(batch.windows)
        w = batch.weights.astype(np.float64)
        agree += float((w * (log_q.argmax(-1) == targets.ids[..., 0])).sum())
        # the k + 1 bucket KL, written out: kept ids, then the rest bucket
        p = np.exp(targets.logprobs.astype(np.float64))
        q_kept = np.take_along_axis(log_q, targets.ids.astype(np.int64), -1)
        rest_q = np.log(1 - np.exp(q_kept).sum(-1))
        tail = targets.tail.astype(np.float64)
        bucket = (p * (targets.logprobs - q_kept)).sum(-1) + np.where(tail > 0, tail * (np.log(np.maximum(tail, 1e-30)) - rest_q), 0)
        kl += float((w * bucket).sum())
        tokens += float(w.sum())
    assert report["top1_agreement"] == pytest.approx(agree / tokens, abs=1.5 / tokens)
    assert report["kl"] == pytest.approx(kl / tokens, rel=2e-4, abs=1e-5)


@pytest.mark.parametrize(("change", "message"), [
    ({"temperature": 2.0}, "at temperature 1.0, this run distils at 2.0"),
    ({"seq_len": 16}, "holds windows of 32 positions, this run packs 16"),
    ({"data": None}, "was made for other data"),
    ({"loss": "rkl"}, "train from it with loss fkl"),
])
def test_a_cache_that_is_not_this_runs_is_refused_in_one_line(tmp_path, cache, small_text, change, message):
    settings = {**SMALL, "cache": str(cache), "preset": "tiny", "data": str(small_text), "steps": 1,
                "out": str(tmp_path / "kd"), "temperature": 1.0, "backend": "torch", **change}
    with pytest.raises((ConfigError, TrainingError), match=message):
        distill(DistillConfig(**settings), progress=False, echo=lambda _: None)
    assert not (tmp_path / "kd").exists()  # refused before anything was written
