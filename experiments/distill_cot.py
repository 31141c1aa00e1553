"""distill-cot: does a student learn more from a teacher's worked steps than from its answers alone, at one
budget? The task is multi-digit addition, which has verifiable answers. A `tiny` teacher learns to solve it
step by step, column by column from the right with the carries written out::

    47+85                      <- the prompt
    7+5=12 write 2 carry 1     <- the completion: one line per column,
    4+8+1=13 write 3 carry 1
    write carry 1              <- the last carry, when there is one,
    = 132                      <- and the answer on the last line

Then the teacher writes its own rationales for a fresh set of prompts (``gemmalab.distill.generate``, greedy),
right or wrong: that is the chain-of-thought student's data. The answer-only student trains on the same
prompts with only the teacher's final answers (``= 132``) as completions. Both students have the same shape,
steps, schedule, batch and seed; on the same held-out problems (none of them in any training set) the
headline is

    accuracy_cot vs accuracy_answer_only (and accuracy_teacher),

the share of held-out problems whose last line is ``= a+b``, decoded greedily.

    gemmalab experiments run distill-cot [--out DIR] [--set student.steps=800] [--set task.max_digits=4]
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gemmalab
from gemmalab.backend import resolve_backend_name
from gemmalab.config import resolve_config
from gemmalab.distill.generate import generate_data
from gemmalab.experiments import Experiment
from gemmalab.experiments.plots import columns, line_plot
from gemmalab.train import TrainConfig, train
from gemmalab.train.checkpoints import complete_checkpoints

SECTIONS = ("task", "shape", "teacher", "student", "generation")
Problem = tuple[int, int]

# -- the task: plain Python, written once -------------------------------------------------------------------

ANSWER_LINE = re.compile(r"=\s*(\d+)")


def problem_prompt(a: int, b: int) -> str:
    """What every model is given: the sum, then a newline where its working starts."""
    return f"{a}+{b}\n"


def rationale(a: int, b: int) -> str:
    """The written-carry working of ``a + b``: one line per column from the right (a missing digit is 0; the
    carry into a column is added only when there is one), the final carry, then ``= a+b`` on the last line."""
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for column in range(max(len(digits_a), len(digits_b))):
        da = int(digits_a[column]) if column < len(digits_a) else 0
        db = int(digits_b[column]) if column < len(digits_b) else 0
        total = da + db + carry
        added = f"+{carry}" if carry else ""
        lines.append(f"{da}+{db}{added}={total} write {total % 10} carry {total // 10}")
        carry = total // 10
    if carry:
        lines.append(f"write carry {carry}")
    return "\n".join(lines) + "\n" + answer_line(a + b)


def answer_line(answer: int) -> str:
    """The last line of every completion, worked or not: the answer-only student's whole completion."""
    return f"= {answer}"


def last_line(text: str) -> str:
    """The last non-blank line of a completion, stripped ('' when there is none): where the answer goes."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def final_answer(text: str) -> int | None:
    """The answer on the last non-blank line of a model's completion, or None when that line is not ``= N``.
    Only the last line counts: a working whose steps are right but whose answer line is missing scores 0."""
    match = ANSWER_LINE.fullmatch(last_line(text))
    return int(match.group(1)) if match else None


def is_correct(problem: Problem, text: str) -> bool:
    return final_answer(text) == problem[0] + problem[1]


def sample_problems(count: int, rng: random.Random, min_digits: int, max_digits: int,
                    taken: set[Problem]) -> list[Problem]:
    """``count`` distinct problems not in ``taken`` (which grows by them, so sets drawn in turn are disjoint).
    Each operand's digit count is drawn uniformly first, so short and long operands are equally common."""
    if min_digits < 1 or max_digits < min_digits:
        raise ValueError(f"digits must satisfy 1 <= min_digits <= max_digits, got {min_digits}..{max_digits}")
    problems: list[Problem] = []
    while len(problems) < count:
        a, b = (rng.randint(10 ** (n - 1), 10**n - 1) for n in (rng.randint(min_digits, max_digits),
                                                                rng.randint(min_digits, max_digits)))
        if (a, b) not in taken:
            taken.add((a, b))
            problems.append((a, b))
    return problems


def split_problems(task: dict[str, Any], seed: int) -> dict[str, list[Problem]]:
    """The three disjoint sets: held-out first (so its problems do not depend on the training sizes), then the
    teacher's training problems, then the students' prompts."""
    rng, taken = random.Random(seed), set()
    digits = (task["min_digits"], task["max_digits"])
    return {name: sample_problems(task[key], rng, *digits, taken)
            for name, key in (("held_out", "held_out"), ("teacher", "teacher_problems"),
                              ("student", "student_problems"))}


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# -- the runs -----------------------------------------------------------------------------------------------


def evaluate(checkpoint: Path, problems: list[Problem], *, backend: str, max_tokens: int, batch_size: int
             ) -> tuple[float, list[str]]:
    """Greedy held-out accuracy of a checkpoint, and its completions."""
    model = gemmalab.load(checkpoint, backend=backend)
    texts: list[str] = []
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        texts += model.generate([problem_prompt(a, b) for a, b in batch], max_tokens, temperature=0.0).texts
    return sum(map(is_correct, problems, texts)) / len(problems), texts


def initial_model(settings: dict[str, Any], out: Path, backend: str) -> dict[str, str]:
    """Where every run starts: the preset's random init (no setting: `gemmalab train` draws it), or, when
    ``shape`` changes some of the preset's config fields, that shape's random init from the same seed, saved
    once in ``out`` (a folder `gemmalab train --model` fine-tunes), so the three runs share one shape."""
    if not settings["shape"]:
        return {}
    preset = resolve_config(settings["preset"])
    config = dataclasses.replace(preset, **settings["shape"], name=f"{preset.name}-custom")
    folder = out / "init"
    if not folder.is_dir():
        gemmalab.init(config, backend=backend, seed=settings["seed"]).save(folder)
    return {"model": str(folder)}


def train_run(settings: dict[str, Any], section: str, data: Path, out: Path, phase: str, progress, log) -> Path:
    """One `gemmalab train` run of a section's settings on ``data``; returns its final checkpoint."""
    common = {k: v for k, v in settings.items() if k not in SECTIONS}
    start = initial_model(settings, out.parent, resolve_backend_name(settings["backend"]))
    config = TrainConfig.from_dict({**common, **start, **settings[section], "data": str(data), "out": str(out)})

    def on_step(record: dict) -> None:
        progress(phase, record["step"], config.steps, f"loss {record['loss']:.3f}")

    return train(config, progress=False, echo=log, on_step=on_step).checkpoint


def teacher_rationales(teacher: Path, problems: list[Problem], out: Path, gen: dict[str, Any], backend: str,
                       seed: int, progress, log) -> Path:
    """The teacher's greedy working for each student prompt, through the library's sequence-level data
    generator (one record per prompt; the prompts are in the form the teacher was trained on, so no template)."""
    prompts = write_jsonl(out / "student_prompts.jsonl",
                          ({"prompt": problem_prompt(a, b), "a": a, "b": b} for a, b in problems))
    done = re.compile(r"teacher responses: (\d+) of (\d+)")

    def echo(line: str) -> None:  # the generator's per-batch line drives the progress bar
        found = done.match(line)
        if found:
            progress("teacher rationales", int(found.group(1)), int(found.group(2)), "")
        else:
            log(line)

    return generate_data(teacher, prompts, out / "cot_data.jsonl", max_tokens=gen["max_tokens"],
                         batch_size=gen["batch_size"], temperature=0.0, seed=seed, backend=backend,
                         progress=False, echo=echo)


def student_data(generated: Path, out: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The two students' training files from the teacher's records, for the same prompts in the same order: its
    whole working, and its last line alone (``= N`` when it wrote an answer; whatever it ended on when not, as
    the working student gets the whole of such a record too: each student learns what the teacher said)."""
    records = [json.loads(line) for line in generated.read_text(encoding="utf-8").splitlines()]
    cot = write_jsonl(out / "student_cot.jsonl", ({"prompt": r["prompt"], "completion": r["completion"]}
                                                  for r in records))
    answers = write_jsonl(out / "student_answer_only.jsonl", ({"prompt": r["prompt"],
                                                               "completion": last_line(r["completion"])}
                                                              for r in records))
    answered = [final_answer(r["completion"]) for r in records]
    right = sum(answer == r["source"]["a"] + r["source"]["b"] for r, answer in zip(records, answered, strict=True))
    figures = {"student_prompts": len(records),
               "teacher_data_answered": sum(answer is not None for answer in answered) / len(records),
               "teacher_data_accuracy": right / len(records)}
    return cot, answers, figures


def score_checkpoints(run_dir: Path, problems: list[Problem], out: Path, **evaluation: Any
                      ) -> list[tuple[int, float]]:
    """(step, held-out accuracy) of every checkpoint a run kept (its ``checkpoint_every``; the final one always),
    oldest first; the final checkpoint's completions go to ``out`` beside whether each is right."""
    curve, texts = [], []
    for path in complete_checkpoints(run_dir):
        accuracy, texts = evaluate(path, problems, **evaluation)
        curve.append((int(path.name.split("-")[-1]), accuracy))
    write_jsonl(out, ({"prompt": problem_prompt(a, b), "completion": text, "correct": is_correct((a, b), text)}
                      for (a, b), text in zip(problems, texts, strict=True)))
    return curve


def run(settings: dict[str, Any], out: Path, progress, log) -> dict[str, Any]:
    task, gen, seed = settings["task"], settings["generation"], settings["seed"]
    backend = resolve_backend_name(settings["backend"])
    problems = split_problems(task, seed)
    held_out = problems["held_out"]
    # room for the longest working the task can need, plus a few tokens to see a model run on past it
    longest = len(rationale(10 ** task["max_digits"] - 1, 10 ** task["max_digits"] - 1)) + 1
    gen = {**gen, "max_tokens": gen["max_tokens"] or longest + 16}
    evaluation = {"backend": backend, "max_tokens": gen["max_tokens"], "batch_size": gen["batch_size"]}
    seconds: dict[str, float] = {}
    curves: dict[str, list[tuple[int, float]]] = {}

    def timed(name: str, work: Callable[[], Any]) -> Any:
        clock = time.perf_counter()
        result = work()
        seconds[name] = round(time.perf_counter() - clock, 1)
        return result

    def train_and_score(name: str, label: str, section: str, data: Path) -> Path:
        checkpoint = timed(name, lambda: train_run(settings, section, data, out / name, label, progress, log))
        progress(f"{label} eval", 0, 0, f"{len(held_out)} held-out problems at each kept checkpoint")
        curves[name] = timed(f"{name}_eval", lambda: score_checkpoints(out / name, held_out,
                                                                       out / f"{name}_held_out.jsonl", **evaluation))
        log(f"{label}: held-out accuracy {curves[name][-1][1]:.3f}")
        return checkpoint

    log(f"1/4: training the teacher on {len(problems['teacher'])} problems worked by the rule "
        f"({settings['teacher']['steps']} steps, {backend})")
    teacher_file = write_jsonl(out / "teacher_data.jsonl", ({"prompt": problem_prompt(a, b),
                                                             "completion": rationale(a, b)}
                                                            for a, b in problems["teacher"]))
    teacher = train_and_score("teacher", "teacher", "teacher", teacher_file)

    log(f"2/4: the teacher works {len(problems['student'])} fresh prompts greedily")
    generated = timed("rationales", lambda: teacher_rationales(teacher, problems["student"], out, gen, backend,
                                                               seed, progress, log))
    cot_file, answer_file, data_figures = student_data(generated, out)
    log(f"its answers are right on {data_figures['teacher_data_accuracy']:.3f} of them "
        f"({data_figures['teacher_data_answered']:.3f} end in an answer line)")

    log(f"3/4: training the CoT student on the teacher's rationales ({settings['student']['steps']} steps)")
    train_and_score("cot", "CoT student", "student", cot_file)
    log(f"4/4: training the answer-only student on its answers alone ({settings['student']['steps']} steps)")
    train_and_score("answer_only", "answer-only student", "student", answer_file)

    plot = line_plot(
        out / "accuracy.png",
        {"CoT student (the teacher's rationales)": columns(curves["cot"]),
         "answer-only student (the teacher's answers)": columns(curves["answer_only"]),
         "teacher (rationales by the rule)": columns(curves["teacher"])},
        title=f"distill-cot: held-out accuracy, {len(held_out)} sums of {task['min_digits']}-{task['max_digits']} "
              f"digit numbers ({backend})",
        xlabel="training step (of each model's own run)", ylabel="exact-answer accuracy (greedy)",
    )
    return {
        "accuracy_cot": curves["cot"][-1][1],
        "accuracy_answer_only": curves["answer_only"][-1][1],
        "accuracy_teacher": curves["teacher"][-1][1],
        "held_out_problems": len(held_out),
        "teacher_steps": settings["teacher"]["steps"],
        "student_steps": settings["student"]["steps"],
        **data_figures,
        "curve_cot": curves["cot"],
        "curve_answer_only": curves["answer_only"],
        "curve_teacher": curves["teacher"],
        "phase_seconds": seconds,
        "backend": backend,
        "teacher_checkpoint": str(teacher),
        "cot_data": generated.name,
        "plot": plot.name,
    }


EXPERIMENT = Experiment(
    name="distill-cot",
    summary="A teacher that adds step by step; students on its rationales vs its answers alone: held-out accuracy.",
    config="configs/distill-cot.yaml",
    expected="about 9 minutes on PyTorch (2 CPU cores)",
    run=run,
    headline=("accuracy_cot", "accuracy_answer_only", "accuracy_teacher", "held_out_problems", "backend"),
    smoke={
        "task.teacher_problems": 64,
        "task.student_problems": 12,
        "task.held_out": 8,
        "task.max_digits": 2,
        "teacher.steps": 4,
        "student.steps": 2,
        "student.checkpoint_every": 1,
        "batch_size": 2,
        "seq_len": 64,
        "generation.max_tokens": 24,
    },
)
