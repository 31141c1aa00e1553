"""Schedules: the learning rate of every optimizer update, and any other per-step value (a distillation
temperature), as plain functions of the step index.

``step`` counts updates already applied (0 for the first update). Warmup rises linearly from lr/warmup to
lr over the first ``warmup`` updates; then the schedule decays over the remaining ``total - warmup``:

* constant: lr;
* linear:   from lr down to ``min_lr`` at the last update;
* cosine:   ``min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2``, progress from 0 to 1.

A run extended past its planned end (``gemmalab train --resume --extend --steps N``) keeps its schedule as it
was, step for step, and trains the extra steps as a new cycle of the same schedule: warmup (by the same rule
as a new run of that length) to the peak lr, then decay to ``min_lr`` at step N. This is a warm restart
(SGDR, Loshchilov & Hutter 2017): a finished cosine run sits at min_lr, and continuing there would barely
train. ``Cycles`` holds the boundaries, which the run saves, so every later resume computes the same rates.

``ValueSchedule`` moves any other value from ``start`` (step 0) to ``end`` (step ``total``, and after), with
no warmup: a distillation temperature annealed from soft to sharp targets (fed to the trainer as the
per-step scalar a ``Distillation(temperature_input=...)`` term reads):

* constant: start (``end`` is ignored);
* linear:   ``start + (end - start) * step / total``;
* cosine:   ``end + (start - end) * (1 + cos(pi * step / total)) / 2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError, InputError

ScheduleName = Literal["constant", "linear", "cosine"]
SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    name: ScheduleName
    lr: float
    total: int
    warmup: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.name!r}: choose one of {', '.join(SCHEDULES)}")
        if self.total < 1 or self.warmup < 0 or self.lr < 0 or self.min_lr < 0:
            raise ConfigError(
                f"schedule needs total >= 1, warmup >= 0, lr >= 0 and min_lr >= 0; got {self.total}, "
                f"{self.warmup}, {self.lr}, {self.min_lr}"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.name == "constant":
            return self.lr
        decay_steps = self.total - self.warmup
        progress = 0.0 if decay_steps <= 1 else min(1.0, (step - self.warmup) / (decay_steps - 1))
        if self.name == "linear":
            return self.lr + (self.min_lr - self.lr) * progress
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(warmup_steps: int, length: int) -> int:
    """The warmup used for a cycle of ``length`` updates: as configured, unless that would take half the
    cycle or more; then a tenth of it."""
    if warmup_steps < length // 2 or warmup_steps == 0:
        return warmup_steps
    return length // 10


@dataclass(frozen=True)
class Cycles:
    """The schedule of a run in cycles: ``bounds`` [0, end_1, end_2, ...] (one cycle for a run never
    extended), each cycle its own Schedule with the shared name, lr and min_lr."""

    name: ScheduleName
    lr: float
    bounds: tuple[int, ...]
    warmup_steps: int
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if len(self.bounds) < 2 or self.bounds[0] != 0 or any(b <= a for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)):
            raise ConfigError(f"schedule cycle bounds must rise from 0, got {list(self.bounds)}")

    @property
    def total(self) -> int:
        return self.bounds[-1]

    def extended(self, total: int) -> Cycles:
        """These cycles plus one more, to ``total`` updates."""
        if total <= self.total:
            raise ConfigError(f"an extension must go past step {self.total}, got steps {total}")
        return Cycles(self.name, self.lr, (*self.bounds, total), self.warmup_steps, self.min_lr)

    def cycle(self, index: int) -> Schedule:
        length = self.bounds[index + 1] - self.bounds[index]
        return Schedule(self.name, self.lr, length, warmup_steps_for(self.warmup_steps, length), self.min_lr)

    def __call__(self, step: int) -> float:
        for index in range(len(self.bounds) - 1):
            if step < self.bounds[index + 1] or index == len(self.bounds) - 2:
                return self.cycle(index)(step - self.bounds[index])
        raise AssertionError("unreachable: bounds has at least two entries")


@dataclass(frozen=True)
class ValueSchedule:
    """A value from ``start`` at step 0 to ``end`` at step ``total`` (held there after), by ``kind``: one of
    SCHEDULES (see the module docstring)."""

    kind: ScheduleName
    start: float
    end: float
    total: int

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise InputError(f"unknown value schedule {self.kind!r}: choose one of {', '.join(SCHEDULES)}")
        if isinstance(self.total, bool) or not isinstance(self.total, int) or self.total < 1:
            raise InputError(f"a value schedule needs total >= 1 steps, got {self.total!r}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise InputError(f"a value schedule's {name} must be a finite number, got {value!r}")

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return float(self.start)
        progress = min(max(step, 0), self.total) / self.total  # held at the ends outside [0, total]
        if self.kind == "linear":
            return self.start + (self.end - self.start) * progress
        return self.end + (self.start - self.end) * (1.0 + math.cos(math.pi * progress)) / 2.0


__all__ = ["SCHEDULES", "Cycles", "Schedule", "ScheduleName", "ValueSchedule", "warmup_steps_for"]
