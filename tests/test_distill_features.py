"""Distillation runs with feature transfer (gemmalab.distill with hidden_weight / attention_weight): on every
backend, a run from a teacher of another width and other head counts keeps its projections beside the
student's checkpoint, never in it; a resumed run continues bit for bit from them; the report's per-layer
figures equal the float64 reference's on the run's own checkpoint and projections. Also the refusals: a
mapping that does not fit, feature transfer from a teacher cache.

The loss terms themselves (value and gradient on every backend) are tests/test_train_transfer.py's."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_clean_failure, run_cli
from safetensors.numpy import load_file

from gemmalab import checkpoint, reference
from gemmalab.config import Gemma3Config
from gemmalab.distill import DistillConfig, distill
from gemmalab.distill.mapping import layer_mapping
from gemmalab.errors import ConfigError
from gemmalab.params import init_weights
from gemmalab.tokenizer import Tokenizer
from gemmalab.train import checkpoints
from gemmalab.train.data import DataStream, load_documents, pack
from gemmalab.train.transfer import attention_transfer, head_groups, hidden_transfer

SMALL = {"seq_len": 24, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "eval_fraction": 0.05, "eval_batches": 1,
         "log_every": 1, "tensorboard": False, "aim": False}
FEATURES = {"hidden_weight": 1.0, "attention_weight": 2.0, "attention_chunk": 7, "mapping": "by-type"}


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory) -> Path:
    """A random teacher checkpoint wider than the tiny student (hidden 96, 8 heads over 4 kv heads), 8 blocks
    (LLLGLLLG), window 6, stored in float32 (so it runs in float32), with the byte-level tokenizer."""
    config = dataclasses.replace(Gemma3Config.preset("tiny"), hidden_size=96, num_attention_heads=8, num_key_value_heads=4,
                                 num_hidden_layers=8, sliding_window=6, name="wide-teacher",
                                 layer_types=("sliding_attention",) * 3 + ("full_attention",) + ("sliding_attention",) * 3
                                 + ("full_attention",))
    folder = tmp_path_factory.mktemp("wide-teacher")
    checkpoint.save_checkpoint(folder, config.with_dtype("float32"), init_weights(config, seed=3, dtype="float32"))
    Tokenizer.byte_level().save(folder)
    return folder


def run(backend: str, out: Path, teacher: Path, **settings):
    config = DistillConfig(teacher=str(teacher), preset="tiny", backend=backend, out=str(out), **{**SMALL, **FEATURES,
                                                                                                   **settings})
    return config, distill(config, progress=False, echo=lambda _: None)


def test_a_feature_run_keeps_its_projections_beside_the_student_and_resumes_from_them(backend, tmp_path, wide_teacher):
    _, straight = run(backend, tmp_path / "straight", wide_teacher, steps=3)
    final = straight.train.checkpoint
    projections = load_file(str(final / checkpoints.LOSS_PARAMETERS_FILE))
    # by-type from 6 blocks (LLLLLG) onto 8 (LLLGLLLG): every student block has a projection 64 -> 96
    assert sorted(projections) == [f"hidden_projection.{i}" for i in range(6)]
    assert all(value.shape == (96, 64) for value in projections.values())
    student = load_file(str(final / "model.safetensors"))
    assert not any("projection" in name for name in student)
    assert checkpoint.read_weights(final, checkpoint.load_config(final))  # an ordinary student checkpoint
    optimizer = load_file(str(final / checkpoints.OPTIMIZER_FILE))
    assert "exp_avg/hidden_projection.0" in optimizer
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/hidden_transfer_1", "loss/attention_transfer_5"} <= set(records[0])

    # the same run killed after its step-2 checkpoint, then resumed: the same weights and projections
    _, cut = run(backend, tmp_path / "cut", wide_teacher, steps=3, checkpoint_every=2)
    shutil.rmtree(cut.train.checkpoint)  # as if killed before step 3 was saved
    _, resumed = run(backend, tmp_path / "cut", wide_teacher, steps=3, checkpoint_every=2, resume=True)
    again = load_file(str(resumed.train.checkpoint / checkpoints.LOSS_PARAMETERS_FILE))
    for name, value in projections.items():
        np.testing.assert_array_equal(again[name], value)
    weights = load_file(str(resumed.train.checkpoint / "model.safetensors"))
    for name, value in student.items():
        np.testing.assert_array_equal(weights[name], value)


def held_out(config: DistillConfig, tokenizer: Tokenizer):
    windows, trained = pack(load_documents(config.data), tokenizer, config.seq_len)
    stream = DataStream(windows, trained, seed=config.seed, eval_fraction=config.eval_fraction)
    return list(stream.eval_batches(config.batch_size, config.eval_batches))


def test_the_report_gives_each_pairs_figures_as_the_reference_computes_them(backend, tmp_path, wide_teacher):
    config, result = run(backend, tmp_path / "kd", wide_teacher, steps=2, mapping="uniform", hidden_weight=0.5,
                         attention_weight=0.0)
    report = result.report
    assert report["mapping"] == "uniform"
    folder = result.train.checkpoint
    projections = load_file(str(folder / checkpoints.LOSS_PARAMETERS_FILE))
    models = {}
    for name, source in (("teacher", wide_teacher), ("student", folder)):
        cfg = checkpoint.load_config(source)
        models[name] = (cfg, checkpoint.read_weights(source, cfg))
    pairs = layer_mapping(models["student"][0], models["teacher"][0], "uniform")
    assert [(row["student_layer"], row["teacher_layer"]) for row in report["layers"]] == \
        [(p.student_layer, p.teacher_layer) for p in pairs]
    groups = head_groups(4, 2, 8, 4)
    cosine, kl, tokens = np.zeros(len(pairs)), np.zeros(len(pairs)), 0.0
    for batch in held_out(config, Tokenizer.from_folder(wide_teacher)):
        captured = {name: reference.forward(cfg, weights, batch.inputs, capture=True)[1]
                    for name, (cfg, weights) in models.items()}
        w = batch.weights.astype(np.float64)
        for i, pair in enumerate(pairs):
            s, t = pair.student_layer, pair.teacher_layer
            cos = 1 - hidden_transfer(captured["student"]["hidden_states"][s + 1], captured["teacher"]["hidden_states"][t + 1],
                                      "cosine", projections[f"hidden_projection.{s}"])
            cosine[i] += float((w * cos).sum())
            kl[i] += float((w * attention_transfer(captured["student"]["attentions"][s],
                                                   captured["teacher"]["attentions"][t], *groups)).sum())
        tokens += float(w.sum())
    for i, row in enumerate(report["layers"]):
        assert row["student_type"] in ("local", "global") and row["teacher_type"] in ("local", "global")
        assert row["hidden_cosine"] == pytest.approx(cosine[i] / tokens, rel=1e-4, abs=1e-5)
        assert row["attention_kl"] == pytest.approx(kl[i] / tokens, rel=1e-4, abs=1e-6)


def test_feature_transfer_refusals(tmp_path, wide_teacher):
    with pytest.raises(ConfigError, match="maps student block"):
        run("torch", tmp_path / "bad", wide_teacher, steps=1, mapping="0:1,0:2")
    assert not (tmp_path / "bad" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="teacher cache holds the teacher's output distribution only"):
        DistillConfig(cache=str(tmp_path), preset="tiny", hidden_weight=1.0)
    with pytest.raises(ConfigError, match="hidden_loss 'l1' is not one of cosine, mse"):
        DistillConfig(teacher=str(wide_teacher), hidden_loss="l1")


# --- gemmalab distill --show-mapping ------------------------------------------------------------------------
def test_show_mapping_prints_a_presets_table_as_json_without_weights():
    result = run_cli("distill", "--show-mapping", "--teacher", "gemma-3-1b", "--student", "gemma-3-270m",
                     "--mapping", "uniform", "--hidden-weight", "1", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    # uniform for 18 student blocks from 26: round((i + 1) * 26 / 18) - 1 (tests/test_distill_mapping.py
    # derives it by hand); types from the 5:1 pattern, global every 6th block
    expected = [0, 2, 3, 5, 6, 8, 9, 11, 12, 13, 15, 16, 18, 19, 21, 22, 24, 25]
    assert [row["teacher_layer"] for row in rows] == expected
    assert [row["student_layer"] for row in rows] == list(range(18))
    kind = {True: "global", False: "local"}
    assert [row["student_type"] for row in rows] == [kind[i % 6 == 5] for i in range(18)]
    assert [row["teacher_type"] for row in rows] == [kind[t % 6 == 5] for t in expected]
    assert all(row["losses"] == ["hidden cosine"] for row in rows)


def test_show_mapping_reads_a_checkpoints_config_and_names_the_losses(wide_teacher):
    result = run_cli("distill", "--show-mapping", "--teacher", str(wide_teacher), "--student", "tiny",
                     "--mapping", "by-type", "--hidden-weight", "1", "--attention-weight", "1")
    assert result.returncode == 0, result.stderr
    assert f"by-type mapping: tiny (6 blocks) <- {wide_teacher} (8 blocks)" in result.stdout
    # tiny LLLLLG onto LLLGLLLG: the global block 5 on the teacher's last global block 7, locals in order
    lines = [line for line in result.stdout.splitlines() if "hidden cosine + attention KL" in line]
    assert len(lines) == 6
    assert lines[5].replace("│", " ").split()[:4] == ["5", "global", "7", "global"]
    assert "projected 64 -> 96" in result.stdout
    assert_clean_failure(run_cli("distill", "--show-mapping", "--teacher", "gemma-3-1b", "--student", "gemma-3-270m",
                                 "--mapping", "0:30"), "teacher block 30 is out of range")


def test_the_cli_runs_feature_transfer_and_reports_each_pair(tmp_path, wide_teacher):
    out = tmp_path / "kd"
    result = run_cli("distill", "--teacher", str(wide_teacher), "--student", "tiny", "--mapping", "by-type",
                     "--hidden-weight", "1", "--attention-weight", "0.5", "--steps", "2", "--seq-len", "16",
                     "--batch-size", "1", "--backend", "torch", "--out", str(out), "--quiet",
                     "--set", "eval_batches=1", "--set", "tensorboard=false")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["mapping"] == "by-type" and len(report["layers"]) == 6
    assert report["settings"]["hidden_weight"] == 1.0 and report["settings"]["attention_weight"] == 0.5
    assert all(row["hidden_cosine"] is not None and row["attention_kl"] >= 0 for row in report["layers"])
