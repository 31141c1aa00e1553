"""Learning-rate schedules: the learning rate of every optimizer update, as a plain function of its index.

``step`` counts updates already applied (0 for the first update). Warmup rises linearly from lr/warmup to
lr over the first ``warmup`` updates; then the schedule decays over the remaining ``total - warmup``:

* constant: lr;
* linear:   from lr down to ``min_lr`` at the last update;
* cosine:   ``min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2``, progress from 0 to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

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


__all__ = ["SCHEDULES", "Schedule", "ScheduleName"]
