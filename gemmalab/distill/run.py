"""``distill(DistillConfig(...))``: a distillation run -- the training loop (gemmalab.train.train) with the
teacher objective -- and its report: ``DIR/report.json`` with the headline figures and the settings, and
``DIR/curves.png`` with the loss components and the held-out figures over the run."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_bytes
from ..outputs import writing
from ..train.loop import TrainResult, train
from .cached import CachedTeacherObjective
from .config import DistillConfig
from .teacher import TeacherObjective

REPORT_FILE = "report.json"
CURVES_FILE = "curves.png"


@dataclass
class DistillResult:
    train: TrainResult
    report: dict[str, Any]
    report_path: Path
    curves_path: Path | None


def distill(config: DistillConfig, *, progress: bool = True, echo=print, log_lines: bool = False,
            on_step: Callable[[dict], None] | None = None) -> DistillResult:
    """Run (or resume, with ``config.resume``) the distillation ``config`` describes; see gemmalab.train.train
    for ``progress``, ``log_lines`` and ``on_step``."""
    objective = CachedTeacherObjective(config) if config.cache else TeacherObjective(config)
    result = train(config, progress=progress, echo=echo, log_lines=log_lines, on_step=on_step, objective=objective)
    report = build_report(config, result, objective.layer_pairs(config) if not config.cache else None)
    path = result.run_dir / REPORT_FILE
    with writing(path, "report"):
        atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    curves = plot_curves(result.run_dir / CURVES_FILE, result.run_dir, config)
    return DistillResult(result, report, path, curves)


def layer_report(final: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-pair figures of an evaluation record, one entry per mapped student block, in block order."""
    blocks = sorted({int(key.rpartition("/")[2]) for key in final if key.startswith(("eval_hidden_cosine/",
                                                                                      "eval_attention_kl/"))})
    return [{"student_layer": block, "hidden_cosine": final.get(f"eval_hidden_cosine/{block}"),
             "attention_kl": final.get(f"eval_attention_kl/{block}")} for block in blocks]


def build_report(config: DistillConfig, result: TrainResult, mapping: list | None = None) -> dict[str, Any]:
    """The headline figures of the last evaluation (the end of the run), the layer mapping with each pair's
    figures (``mapping``: the run's mapping.LayerPair list, when it transfers features or reports layers),
    and the settings."""
    final = next((r for r in reversed(result.history) if "eval_loss" in r), {})
    layers = []
    if mapping:
        figures = {row["student_layer"]: row for row in layer_report(final)}
        layers = [{**pair.as_dict(), **{k: v for k, v in figures.get(pair.student_layer, {}).items()
                                        if k != "student_layer"}} for pair in mapping]
    return {
        "student_perplexity": final.get("eval_perplexity"),
        "teacher_perplexity": final.get("eval_teacher_perplexity"),
        "top1_agreement": final.get("eval_top1_agreement"),
        "kl": final.get("eval_kl"),
        "student_loss": final.get("eval_loss"),
        "teacher_loss": final.get("eval_teacher_loss"),
        "final_train_loss": result.final_loss,
        "steps": result.steps,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        **({"mapping": config.mapping, "layers": layers} if mapping else {}),
        "settings": config.to_dict(),
    }


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (all of them, a resumed run's included)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(path: Path, run_dir: Path, config: DistillConfig) -> Path | None:
    """Two panels: the training loss and its components, and the held-out losses and KL (None without
    records)."""
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        return [s for s, _ in points], [v for _, v in points]

    figure, (train_axes, eval_axes) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    try:
        keys = ["loss"] + sorted({k for r in records for k in r if k.startswith("loss/")})
        for key in keys:
            x, y = series(key)
            if x:
                train_axes.plot(x, y, label="total" if key == "loss" else key.removeprefix("loss/"))
        train_axes.set(title=f"training ({config.loss}, alpha {config.alpha}, T {config.temperature})",
                       xlabel="step", ylabel="nats per token")
        for key, label in (("eval_loss", "student loss"), ("eval_teacher_loss", "teacher loss"),
                           ("eval_kl", "KL(teacher || student)")):
            x, y = series(key)
            if x:
                eval_axes.plot(x, y, label=label, marker="o" if len(x) < 12 else None, markersize=3)
        eval_axes.set(title="held out", xlabel="step", ylabel="nats per token")
        for axes in (train_axes, eval_axes):
            axes.grid(alpha=0.3)
            if axes.lines:
                axes.legend()
        figure.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp")
        with writing(path, "plot"):
            figure.savefig(tmp, format="png")
            tmp.replace(path)
    finally:
        plt.close(figure)
    return path


__all__ = ["CURVES_FILE", "REPORT_FILE", "DistillResult", "build_report", "distill", "plot_curves", "read_metrics"]
