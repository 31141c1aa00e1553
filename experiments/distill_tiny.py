"""distill-tiny: does distillation help a student at a fixed budget? A `tiny` teacher is trained on the
whole embedded corpus for 1600 steps; then two `tiny` students, same data (by default
a seeded seventh of the corpus, ``student.max_train_windows``), steps and schedule, one trained on the hard
labels alone and one distilled from the teacher. The headline is the share of the teacher-student
perplexity gap that distillation closes,

    gap_closed = (ppl_plain - ppl_kd) / (ppl_plain - ppl_teacher),

all three perplexities on the same held-out windows.

    gemmalab experiments run distill-tiny [--out DIR] [--set distillation.temperature=4]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemmalab.backend import resolve_backend_name
from gemmalab.distill import DistillConfig, distill
from gemmalab.experiments import Experiment
from gemmalab.experiments.plots import columns, line_plot
from gemmalab.experiments.progress import step_reporter
from gemmalab.train import TrainConfig, train
from gemmalab.train.losses import perplexity_from_loss

SECTIONS = ("teacher", "student", "distillation")


def run(settings: dict[str, Any], out: Path, progress, log) -> dict[str, Any]:
    common = {k: v for k, v in settings.items() if k not in SECTIONS}
    teacher = TrainConfig.from_dict({**common, **settings["teacher"], "out": str(out / "teacher")})
    plain = TrainConfig.from_dict({**common, **settings["student"], "out": str(out / "plain")})
    backend = resolve_backend_name(teacher.backend)

    def reporter(phase: str, total: int, curve: list[tuple[int, float]] | None = None):
        return step_reporter(progress, phase, total, curve)

    log(f"1/3: training the teacher ({teacher.preset}, {teacher.steps} steps) on {backend}")
    taught = train(teacher, progress=False, echo=log, on_step=reporter("teacher", teacher.steps))

    plain_curve: list[tuple[int, float]] = []
    log(f"2/3: training the plain student ({plain.preset}, {plain.steps} steps)")
    plain_run = train(plain, progress=False, echo=log, on_step=reporter("plain student", plain.steps, plain_curve))

    kd = DistillConfig.from_dict({**common, **settings["student"], **DistillConfig.flatten(
        {"distillation": settings["distillation"]}), "teacher": str(taught.checkpoint), "out": str(out / "kd")})
    kd_curve: list[tuple[int, float]] = []
    log(f"3/3: distilling the teacher into the second student ({kd.loss}, alpha {kd.alpha}, T {kd.temperature})")
    kd_run = distill(kd, progress=False, echo=log, on_step=reporter("distilled student", kd.steps, kd_curve))

    ppl_plain = perplexity_from_loss(plain_run.eval_loss)  # the plain run always evaluates at its end
    ppl_kd = kd_run.report["student_perplexity"]
    ppl_teacher = kd_run.report["teacher_perplexity"]
    plain_curve.append((plain_run.steps, ppl_plain))
    kd_curve.append((kd_run.train.steps, ppl_kd))
    gap = ppl_plain - ppl_teacher
    plot = line_plot(
        out / "gap.png",
        {"plain student": columns(plain_curve), "distilled student": columns(kd_curve),
         f"teacher ({teacher.steps} steps)": ([0, plain.steps], [ppl_teacher, ppl_teacher])},
        title=f"distill-tiny: held-out perplexity, students at {plain.steps} steps on "
              f"{plain.max_train_windows or 'all'} windows ({backend})",
        xlabel="student step", ylabel="held-out perplexity", log_y=True,
    )
    return {
        "gap_closed": (ppl_plain - ppl_kd) / gap if gap > 0 else None,
        "ppl_plain": ppl_plain,
        "ppl_kd": ppl_kd,
        "ppl_teacher": ppl_teacher,
        "top1_agreement_kd": kd_run.report["top1_agreement"],
        "kl_kd": kd_run.report["kl"],
        "student_train_windows": plain.max_train_windows,  # None: the whole corpus
        "backend": backend,
        "teacher_checkpoint": str(taught.checkpoint),
        "plot": plot.name,
    }


EXPERIMENT = Experiment(
    name="distill-tiny",
    summary="Train a teacher, then a plain and a distilled student at one budget: the share of the gap KD closes.",
    config="configs/distill-tiny.yaml",
    expected="about 5 minutes on PyTorch (2 CPU cores)",
    run=run,
    headline=("gap_closed", "ppl_plain", "ppl_kd", "ppl_teacher", "backend"),
    smoke={
        "teacher.steps": 6,
        "student.steps": 3,
        "student.eval_every": 0,
        "batch_size": 2,
        "seq_len": 32,
        "eval_batches": 1,
    },
)
