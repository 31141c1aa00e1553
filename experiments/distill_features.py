"""distill-features: does transferring hidden states and attention maps help beyond the logits, at one budget?
A `tiny` teacher (6 blocks, hidden 64, 4 heads over 2 kv heads, window 8) is trained on the whole embedded
corpus; then three `tiny-mqa` students (7 blocks, hidden 48, 2 heads over 1 kv head, window 5), the same data
(a seeded 512 windows), steps and schedule: one on the hard labels alone, one distilled on the logits, and one
distilled on the logits plus hidden-state transfer (cosine, through a learned 48 -> 64 projection per pair)
and attention-map transfer (KL of the attention rows, the heads averaged to one group on each side) on the
mapped layer pairs (``distillation.mapping``: by default local onto local and global onto global, by hand,
since the student's last local block follows its global one and the teacher has no local block there). The
headline is the share of the teacher-student perplexity gap each distilled student closes,

    gap_closed = (ppl_plain - ppl_student) / (ppl_plain - ppl_teacher),

all perplexities on the same held-out windows; report.json also has each mapped pair's hidden-state cosine
and attention KL at the end, for both distilled students.

    gemmalab experiments run distill-features [--out DIR] [--set features.attention_weight=0]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemmalab.backend import resolve_backend_name
from gemmalab.config import resolve_config
from gemmalab.distill import DistillConfig, distill
from gemmalab.distill.mapping import layer_mapping
from gemmalab.experiments import Experiment
from gemmalab.experiments.plots import columns, line_plot
from gemmalab.experiments.progress import step_reporter
from gemmalab.train import TrainConfig, train
from gemmalab.train.losses import perplexity_from_loss

SECTIONS = ("teacher", "student", "distillation", "features")


def run(settings: dict[str, Any], out: Path, progress, log) -> dict[str, Any]:
    common = {k: v for k, v in settings.items() if k not in SECTIONS}
    teacher = TrainConfig.from_dict({**common, **settings["teacher"], "out": str(out / "teacher")})
    plain = TrainConfig.from_dict({**common, **settings["student"], "out": str(out / "plain")})
    backend = resolve_backend_name(teacher.backend)
    # a mapping that does not fit the pair is refused now, not after the teacher and two students have trained
    layer_mapping(resolve_config(plain.preset), resolve_config(teacher.preset), settings["distillation"]["mapping"])

    log(f"1/4: training the teacher ({teacher.preset}, {teacher.steps} steps) on {backend}")
    taught = train(teacher, progress=False, echo=log, on_step=step_reporter(progress, "teacher", teacher.steps))
    curves: dict[str, list[tuple[int, float]]] = {"plain student": [], "logits": [], "logits + features": []}
    log(f"2/4: training the plain student ({plain.preset}, {plain.steps} steps)")
    plain_run = train(plain, progress=False, echo=log,
                      on_step=step_reporter(progress, "plain student", plain.steps, curves["plain student"]))

    def distilled(name: str, extra: dict[str, Any]) -> dict[str, Any]:
        config = DistillConfig.from_dict({**common, **settings["student"], **DistillConfig.flatten(
            {"distillation": {**settings["distillation"], **extra}}), "teacher": str(taught.checkpoint),
            "layer_figures": True, "out": str(out / name.replace(" + ", "-"))})
        run = distill(config, progress=False, echo=log, on_step=step_reporter(progress, name, config.steps, curves[name]))
        curves[name].append((run.train.steps, run.report["student_perplexity"]))  # the end-of-run evaluation
        return run.report

    log("3/4: distilling on the logits alone")
    logits = distilled("logits", {})
    log("4/4: distilling on the logits, hidden states and attention maps")
    features = distilled("logits + features", settings["features"])

    ppl_plain = perplexity_from_loss(plain_run.eval_loss)  # the plain run always evaluates at its end
    ppl_teacher = features["teacher_perplexity"]
    curves["plain student"].append((plain_run.steps, ppl_plain))
    gap = ppl_plain - ppl_teacher

    def closed(report: dict[str, Any]) -> float | None:
        return (ppl_plain - report["student_perplexity"]) / gap if gap > 0 else None

    plot = line_plot(
        out / "gap.png",
        {**{name: columns(points) for name, points in curves.items()},
         f"teacher ({teacher.steps} steps)": ([0, plain.steps], [ppl_teacher, ppl_teacher])},
        title=f"distill-features: {plain.preset} students of a {teacher.preset} teacher ({backend})",
        xlabel="student step", ylabel="held-out perplexity", log_y=True,
    )
    return {
        "gap_closed_logits": closed(logits),
        "gap_closed_features": closed(features),
        "ppl_plain": ppl_plain,
        "ppl_logits": logits["student_perplexity"],
        "ppl_features": features["student_perplexity"],
        "ppl_teacher": ppl_teacher,
        "mapping": features["mapping"],
        "layers_logits": logits["layers"],
        "layers_features": features["layers"],
        "features": settings["features"],
        "backend": backend,
        "plot": plot.name,
    }


EXPERIMENT = Experiment(
    name="distill-features",
    summary="Logits-only distillation against logits + hidden states + attention maps, same budget: gap closed by each.",
    config="configs/distill-features.yaml",
    expected="about 7 minutes on PyTorch (2 CPU cores)",
    run=run,
    headline=("gap_closed_logits", "gap_closed_features", "ppl_plain", "ppl_logits", "ppl_features", "ppl_teacher"),
    smoke={
        "teacher.steps": 6,
        "student.steps": 3,
        "student.eval_every": 0,
        "batch_size": 2,
        "seq_len": 32,
        "eval_batches": 1,
    },
)
