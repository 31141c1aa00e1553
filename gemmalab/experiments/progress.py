"""What experiments hand the training loop as ``on_step``: the phase's progress, and a held-out curve."""

from __future__ import annotations

from collections.abc import Callable

from .registry import ProgressFn


def step_reporter(progress: ProgressFn, phase: str, total: int, curve: list[tuple[int, float]] | None = None,
                  key: str = "eval_perplexity") -> Callable[[dict], None]:
    """An ``on_step(record)`` that reports each step of ``phase`` (of ``total``) with its loss, and appends
    ``(step, record[key])`` to ``curve`` at each evaluation."""

    def on_step(record: dict) -> None:
        if curve is not None and key in record:
            curve.append((record["step"], record[key]))
        progress(phase, record["step"], total, f"loss {record['loss']:.3f}")

    return on_step


__all__ = ["step_reporter"]
