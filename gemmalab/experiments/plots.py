"""PNG figures for experiment reports, drawn with matplotlib's file-only Agg backend (no screen needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..outputs import writing


def line_plot(
    path: Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
) -> Path:
    """One PNG of curves, ``series`` = {label: (x values, y values)}; empty series are left out."""
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window: experiments run on servers and in CI
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        for label, (x, y) in series.items():
            if len(x):
                axes.plot(list(x), list(y), label=label, marker="o" if len(x) < 12 else None, markersize=3)
        axes.set_title(title)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        if log_y:
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp")
        with writing(path, "plot"):
            figure.savefig(tmp, format="png")
            tmp.replace(path)  # atomic: a reader never sees half a PNG
    finally:
        plt.close(figure)
    return path


def columns(points: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """(x values, y values) of a list of (x, y) points: a ``line_plot`` series."""
    return [x for x, _ in points], [y for _, y in points]


__all__ = ["columns", "line_plot"]
