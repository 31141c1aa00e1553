"""On-policy and sequence-level distillation (gemmalab.distill.onpolicy; GKD's lmbda and seq_kd): who writes
each micro-batch, the prompts and the rebuilt rows by hand; on every backend, a rewritten batch holds the
prompts continued greedily by the student (lmbda) or the teacher (seq_kd) exactly as the float64 reference
continues them; and a run mixing the three kinds of batches logs their shares and trains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gemmalab import checkpoint, reference
from gemmalab.backend import get_backend
from gemmalab.config import Gemma3Config
from gemmalab.distill import DistillConfig, distill, onpolicy
from gemmalab.distill.teacher import TeacherObjective
from gemmalab.errors import ConfigError
from gemmalab.params import init_weights
from gemmalab.tokenizer import Tokenizer
from gemmalab.train.data import Batch

CONFIG = Gemma3Config.preset("tiny")


# --- the decisions, by hand ---------------------------------------------------------------------------------
def test_who_writes_a_batch_follows_lmbda_and_seq_kd():
    draws = [(step, micro) for step in range(1000) for micro in range(2)]
    kinds = [onpolicy.batch_kind(7, step, micro, 0.3, False) for step, micro in draws]
    assert set(kinds) == {"student", "data"}
    assert kinds.count("student") / len(kinds) == pytest.approx(0.3, abs=0.03)  # 2000 draws: sd 0.01
    assert kinds == [onpolicy.batch_kind(7, step, micro, 0.3, False) for step, micro in draws]  # a resume agrees
    assert {onpolicy.batch_kind(7, s, m, 0.3, True) for s, m in draws} == {"student", "teacher"}
    assert {onpolicy.batch_kind(7, s, m, 0.0, False) for s, m in draws} == {"data"}
    assert {onpolicy.batch_kind(7, s, m, 1.0, True) for s, m in draws} == {"student"}


def test_prompts_and_rebuilt_rows_by_hand():
    # inputs i predicts target i: weight 1 at index 3 means the target after input 3 is the first trained one,
    # so the prompt is inputs 0..3
    assert onpolicy.prompt_length(np.array([0, 0, 0, 1, 1, 0])) == 4
    assert onpolicy.prompt_length(np.ones(6)) == 3  # trained from the start: half the row
    assert onpolicy.prompt_length(np.zeros(6)) == 3
    batch = onpolicy.continued_batch([[5, 6, 7], [4]], [[8, 9], [1, 2, 3, 4, 5, 6, 7]], seq_len=6, pad=0)
    np.testing.assert_array_equal(batch.inputs, [[5, 6, 7, 8, 9, 0], [4, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(batch.targets, [[6, 7, 8, 9, 0, 0], [1, 2, 3, 4, 5, 6]])
    # trained: the targets that are continuation tokens (8, 9; and 1..6, cut at the window)
    np.testing.assert_array_equal(batch.weights, [[0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])


def test_bad_settings_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="set alpha 0"):
        DistillConfig(teacher=str(tmp_path), lmbda=0.5, alpha=0.5)
    with pytest.raises(ConfigError, match="lmbda must be in"):
        DistillConfig(teacher=str(tmp_path), lmbda=1.5, alpha=0.0)
    with pytest.raises(ConfigError, match="need the teacher itself, not a cache"):
        DistillConfig(cache=str(tmp_path), seq_kd=True)


# --- the backends against the reference ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, dict]:
    """A float32 tiny teacher with std 0.3 weights (clear argmax margins) and the byte-level tokenizer."""
    weights = init_weights(CONFIG, seed=3, std=0.3)
    folder = checkpoint.save_checkpoint(tmp_path_factory.mktemp("teacher"), CONFIG.with_dtype("float32"), weights)
    Tokenizer.byte_level().save(folder)
    return folder, weights


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    pairs = [(f"Q: {a}+{b}=", f" {a + b}") for a in range(1, 9) for b in range(2, 7)]
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    return path


def reference_greedy(config, weights: dict, ids: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation by full float64 forward passes, ending with the eos id when one is chosen (as
    Model.generate's token rows do)."""
    new: list[int] = []
    for _ in range(max_tokens):
        token = int(np.argmax(reference.forward(config, weights, np.array([ids + new]))[0, -1]))
        new.append(token)
        if token in config.eos_token_ids:
            break
    return new


@pytest.mark.parametrize("writer", ["student", "teacher"])
def test_a_rewritten_batch_holds_the_writers_greedy_continuations(backend, teacher, data, tmp_path, writer):
    folder, teacher_weights = teacher
    settings = {"lmbda": 1.0} if writer == "student" else {"seq_kd": True}
    config = DistillConfig(teacher=str(folder), preset="tiny", data=str(data), alpha=0.0, loss="jsd", beta=0.5,
                           gen_temperature=0.0, max_new_tokens=5, seq_len=16, batch_size=2, backend=backend,
                           out=str(tmp_path / "run"), **settings)
    objective = TeacherObjective(config)
    source = objective.model_source(config)
    b = get_backend(backend)
    objective.start(b, config, source.config, source.tokenizer, None, None, echo=lambda _: None)
    student_weights = init_weights(source.config, seed=5, std=0.3)
    trainer = b.trainer(b.build(source.config, student_weights, dtype="float32"), objective.train_spec(config),
                        companions=objective.companions())
    objective.attach(trainer)
    # two drawn rows: a prompt of 4 inputs then a trained reply, and a plain-text row trained throughout
    inputs = np.array([[2, 81, 58, 32, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60],
                       [2, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84]], np.int32)
    weights = np.ones(inputs.shape, np.float32)
    weights[0, :3] = 0
    drawn = Batch(inputs, np.roll(inputs, -1, axis=1), weights)
    got = objective.rewrite(b, trainer, drawn, step=0, micro=0)

    writer_config, writer_weights = (source.config, student_weights) if writer == "student" else (CONFIG, teacher_weights)
    prompts = [inputs[0, :4].tolist(), inputs[1, :8].tolist()]  # 4 prompt inputs; half of the plain row
    continuations = [reference_greedy(writer_config, writer_weights, p, 5) for p in prompts]
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations, strict=True)):
        ids = prompt + continuation
        np.testing.assert_array_equal(got.inputs[row, : len(ids) - 1], ids[:-1])
        np.testing.assert_array_equal(got.targets[row, : len(ids) - 1], ids[1:])
        expected = np.zeros(16)
        expected[len(prompt) - 1 : len(ids) - 1] = 1  # the targets that are the writer's tokens
        np.testing.assert_array_equal(got.weights[row], expected)
    assert objective.step_metrics() == {"batches/student": float(writer == "student"),
                                        "batches/teacher": float(writer == "teacher")}


def test_a_run_mixing_on_policy_teacher_and_data_batches_logs_their_shares(backend, teacher, data, tmp_path):
    folder, _ = teacher
    config = DistillConfig(teacher=str(folder), preset="tiny", data=str(data), alpha=0.0, loss="jsd", beta=0.5,
                           lmbda=0.5, seq_kd=True, max_new_tokens=4, seq_len=24, batch_size=2, grad_accum=2, steps=3,
                           backend=backend, out=str(tmp_path / "run"), lr=3e-3, warmup_steps=1, eval_fraction=0.1,
                           eval_batches=1, log_every=1, tensorboard=False, aim=False)
    result = distill(config, progress=False, echo=lambda _: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "batches/student" in r]
    assert len(steps) == 3
    for r in steps:
        kinds = [onpolicy.batch_kind(config.seed, r["step"] - 1, micro, 0.5, True) for micro in range(2)]
        assert r["batches/student"] == kinds.count("student") / 2
        assert r["batches/student"] + r["batches/teacher"] == 1.0
        assert np.isfinite(r["loss"]) and r["loss"] > 0
    assert result.train.steps == 3
