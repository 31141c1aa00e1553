"""Where a run's numbers go: ``metrics.jsonl`` always, TensorBoard event files, and Aim when installed.

``metrics.jsonl`` has one JSON object per logged step (at least ``step`` and ``loss``; evaluations add
``eval_loss`` and ``eval_perplexity``). TensorBoard files are written with tensorboardX, which needs neither
torch nor tensorflow. On resume, records after the checkpoint's step are dropped from ``metrics.jsonl``
(and purged from TensorBoard's view), so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from ..checkpoint import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records of steps <= last_step (a killed run may have logged past its checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode("utf-8"))


def _clean(record: dict) -> dict:
    """JSON-safe numbers: NaN and inf become strings rather than invalid JSON."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class Tracker:
    """Writes each logged record to metrics.jsonl, TensorBoard and (when enabled and installed) Aim."""

    def __init__(self, run_dir: Path, *, resume_step: int | None, tensorboard: bool = True, aim: bool = True,
                 hparams: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            truncate_metrics(self.metrics_path, resume_step)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        self._file = self.metrics_path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(logdir=str(self.run_dir / "tensorboard"), purge_step=purge)
        self._aim = None
        if aim:
            try:
                import aim as aim_sdk
            except ImportError:
                aim_sdk = None
            if aim_sdk is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._aim = aim_sdk.Run(repo=str(self.run_dir), experiment=self.run_dir.name)
                self._aim["hparams"] = hparams or {}

    def log(self, record: dict) -> None:
        """One record with a ``step``; numeric fields go to TensorBoard/Aim as scalars."""
        self._file.write(json.dumps(_clean(record)) + "\n")
        self._file.flush()
        step = int(record["step"])
        for key, value in record.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if self._tb is not None:
                self._tb.add_scalar(key, value, step)
            if self._aim is not None and math.isfinite(value):
                self._aim.track(value, name=key, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._aim is not None:
            self._aim.close()


__all__ = ["METRICS_FILE", "Tracker", "truncate_metrics"]
