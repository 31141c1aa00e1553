"""The distill-cot experiment: its task (the written-carry rationale and the answer checker, against sums worked
by hand) and its smoke run through the registry, which writes real data, students and a report."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest

from gemmalab.experiments import REPORT_FILE, experiments_folder, get

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def task():
    """The experiment file as a module, loaded as the registry loads it (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location("distill_cot_under_test", experiments_folder() / "distill_cot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rationale_writes_every_column_and_carry_as_worked_by_hand(task):
    # 47 + 85: 7+5 = 12, write 2 carry 1; 4+8+1 = 13, write 3 carry 1; the last carry is written; 132
    assert task.rationale(47, 85) == (
        "7+5=12 write 2 carry 1\n"
        "4+8+1=13 write 3 carry 1\n"
        "write carry 1\n"
        "= 132"
    )
    # 347 + 85: the shorter operand's missing hundreds digit is 0, and no carry means no "+0"
    assert task.rationale(347, 85) == (
        "7+5=12 write 2 carry 1\n"
        "4+8+1=13 write 3 carry 1\n"
        "3+0+1=4 write 4 carry 0\n"
        "= 432"
    )
    # 23 + 41: no carries anywhere, no final carry line
    assert task.rationale(23, 41) == "3+1=4 write 4 carry 0\n2+4=6 write 6 carry 0\n= 64"
    assert task.problem_prompt(47, 85) == "47+85\n" and task.answer_line(132) == "= 132"


def test_the_checker_reads_only_the_last_line(task):
    assert task.final_answer(task.rationale(47, 85)) == 132
    assert task.is_correct((47, 85), task.rationale(47, 85))
    assert task.is_correct((47, 85), "= 132\n\n")  # an answer-only completion; trailing blank lines are fine
    assert not task.is_correct((47, 85), "= 131")
    # right steps without the answer line score nothing, and an answer in the middle is not the answer
    assert task.final_answer("7+5=12 write 2 carry 1\n4+8+1=13 write 3 carry 1") is None
    assert task.final_answer("= 132\nwrite carry 1") is None
    assert task.final_answer("= 13x") is None and task.final_answer("") is None
    assert task.last_line("7+5=12 write 2 carry 1\n= 132 \n\n") == "= 132" and task.last_line("\n") == ""
    # every rationale the rule writes is checked right, for any sum of 1..4 digit operands
    rng = random.Random(0)
    for _ in range(200):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        assert task.is_correct((a, b), task.rationale(a, b))


def test_the_problem_sets_are_disjoint_and_within_their_digits(task):
    sets = task.split_problems({"min_digits": 2, "max_digits": 3, "held_out": 50, "teacher_problems": 400,
                                "student_problems": 100}, seed=0)
    assert [len(sets[k]) for k in ("held_out", "teacher", "student")] == [50, 400, 100]
    flat = [p for problems in sets.values() for p in problems]
    assert len(set(flat)) == len(flat)
    assert all(10 <= n <= 999 for p in flat for n in p)
    # the held-out problems depend on the seed only, not on how many training problems are drawn after them
    again = task.split_problems({"min_digits": 2, "max_digits": 3, "held_out": 50, "teacher_problems": 9,
                                 "student_problems": 9}, seed=0)
    assert again["held_out"] == sets["held_out"]


def test_distill_cot_smoke_run_reports_the_three_accuracies(tmp_path, task):
    from gemmalab.experiments.registry import run

    entry = get("distill-cot")
    assert "gemmalab experiments run distill-cot" in entry.config_text().split("\n\n")[0]
    sections = {f"{s}.{k}" for s, values in entry.settings().items() if isinstance(values, dict) for k in values}
    assert set(entry.smoke) <= sections | set(entry.settings())
    out = tmp_path / "run"
    report = run(entry, out, overrides=[f"{k}={json.dumps(v)}" for k, v in entry.smoke.items()])
    assert json.loads((out / REPORT_FILE).read_text()) == json.loads(json.dumps(report))
    held_out = entry.smoke["task.held_out"]
    assert report["held_out_problems"] == held_out
    for key in ("accuracy_cot", "accuracy_answer_only", "accuracy_teacher"):  # a share of the held-out problems
        assert 0.0 <= report[key] <= 1.0 and (report[key] * held_out).is_integer()
    # the teacher's generated data: one record per student prompt, in order, with its prompt form
    records = [json.loads(line) for line in (out / report["cot_data"]).read_text().splitlines()]
    prompts = entry.smoke["task.student_problems"]
    assert len(records) == prompts == report["student_prompts"]
    assert [r["index"] for r in records] == list(range(prompts))
    assert all(r["prompt"] == task.problem_prompt(r["source"]["a"], r["source"]["b"]) for r in records)
    # the two students' files hold the same prompts: the teacher's whole records, and their last lines alone
    cot = [json.loads(line) for line in (out / "student_cot.jsonl").read_text().splitlines()]
    answers = [json.loads(line) for line in (out / "student_answer_only.jsonl").read_text().splitlines()]
    assert cot == [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]
    assert answers == [{"prompt": r["prompt"], "completion": task.last_line(r["completion"])} for r in records]
    assert 0.0 <= report["teacher_data_accuracy"] <= report["teacher_data_answered"] <= 1.0
    # one curve point per kept checkpoint (checkpoint_every 1), ending at the reported accuracy
    steps = entry.smoke["student.steps"]
    for name in ("cot", "answer_only"):
        assert [s for s, _ in report[f"curve_{name}"]] == list(range(1, steps + 1))
        assert report[f"curve_{name}"][-1][1] == report[f"accuracy_{name}"]
    assert list(report["curve_teacher"][-1]) == [entry.smoke["teacher.steps"], report["accuracy_teacher"]]
    assert set(report["phase_seconds"]) == {f"{run}{part}" for run in ("teacher", "cot", "answer_only")
                                            for part in ("", "_eval")} | {"rationales"}
    for name in ("teacher", "cot", "answer_only"):  # the final checkpoints' held-out completions, one per problem
        scored = [json.loads(line) for line in (out / f"{name}_held_out.jsonl").read_text().splitlines()]
        assert len(scored) == held_out and sum(r["correct"] for r in scored) == report[f"accuracy_{name}"] * held_out
    assert (out / report["plot"]).read_bytes()[:8] == PNG_MAGIC
