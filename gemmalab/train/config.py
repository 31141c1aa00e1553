"""A training run's configuration: one typed dataclass, read from YAML and overridden key by key.

Every field is a flat key, the same in the YAML file, in ``--set key=value`` and (for the common ones) in a
``gemmalab train`` flag. Precedence: defaults < a resumed run's saved settings < ``--config FILE.yaml`` <
``--set`` < flags, so ``gemmalab train --out DIR --resume`` alone continues a run as it was configured.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .schedules import SCHEDULES
from .spec import LOSS_CHUNK_TOKENS, OptimizerSpec, TrainSpec


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    preset: str | None = "tiny"  # random init from a preset (byte-level tokenizer) ...
    model: str | None = None  # ... or a checkpoint folder / Hub repo id (its own tokenizer); wins over preset
    data: str | None = None  # text file, .jsonl, folder; None = the embedded corpus (pydoc_data.topics)
    backend: str | None = None  # mlx, torch, jax; None = $GEMMALAB_BACKEND, else auto
    device: str | None = None
    seed: int = 0
    # how long and how big
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1  # micro-batches per optimizer step (each of batch_size sequences)
    seq_len: int = 256
    # optimizer and schedule
    optimizer: str = "adamw"  # adamw | adafactor
    lr: float = 1e-4
    min_lr: float = 0.0
    schedule: str = "cosine"  # constant | linear | cosine
    warmup_steps: int = 1000  # capped at a tenth of the run when the run is shorter (a note says so)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    adafactor_decay_rate: float = 0.8
    adafactor_clip_threshold: float = 1.0
    adafactor_eps1: float = 1e-30
    adafactor_eps2: float = 1e-3
    max_grad_norm: float | None = 1.0
    layer_lr_decay: float = 1.0
    unfreeze_every: int = 0  # progressive unfreezing: 0 = off; else train top blocks first, add more every K steps
    unfreeze_blocks: int = 1
    # loss, precision, memory
    label_smoothing: float = 0.0
    loss_chunk_tokens: int = LOSS_CHUNK_TOKENS
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_checkpointing: bool = False
    loss_scale: float = 2.0**15  # fp16 only: the initial dynamic loss scale
    # data split, evaluation, logging, checkpoints
    eval_fraction: float = 0.02
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 8
    log_every: int = 1
    out: str = "runs/train"
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 3
    resume: bool = False
    tensorboard: bool = True
    aim: bool = True  # used when the aim package is installed

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "loss_chunk_tokens", "log_every", "unfreeze_blocks")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.optimizer not in ("adamw", "adafactor"):
            raise ConfigError(f"optimizer {self.optimizer!r} is not one of adamw, adafactor")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision {self.precision!r} is not one of fp32, bf16, fp16")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.preset is None and self.model is None:
            raise ConfigError("nothing to train: give --preset NAME or --model SOURCE")

    # -- the pieces other modules consume ----------------------------------------------------------------
    def train_spec(self) -> TrainSpec:
        return TrainSpec(
            optimizer=OptimizerSpec(
                name=self.optimizer,  # type: ignore[arg-type]
                weight_decay=self.weight_decay,
                betas=(self.beta1, self.beta2),
                eps=self.eps,
                decay_rate=self.adafactor_decay_rate,
                clip_threshold=self.adafactor_clip_threshold,
                eps_adafactor=(self.adafactor_eps1, self.adafactor_eps2),
            ),
            precision=self.precision,  # type: ignore[arg-type]
            max_grad_norm=self.max_grad_norm,
            loss_chunk_tokens=self.loss_chunk_tokens,
            label_smoothing=self.label_smoothing,
            grad_checkpointing=self.grad_checkpointing,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- reading and overriding ----------------------------------------------------------------------------
    @classmethod
    def from_sources(cls, file: str | Path | None = None, sets: list[str] | None = None,
                     flags: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> TrainConfig:
        """Defaults, then ``base`` (a resumed run's own settings), then a YAML file, then ``key=value``
        strings, then explicit flag values (None = unset)."""
        values: dict[str, Any] = dict(base or {})
        if file is not None:
            values.update(_read_yaml(Path(file)))
        for item in sets or []:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r} is not key=value: write e.g. --set lr=3e-4")
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        values.update({k: v for k, v in (flags or {}).items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}: see `gemmalab train --help`")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML ({err}): fix the file") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of setting: value")
    return loaded


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check (and gently convert: 1 -> 1.0, '3e-4' -> 3e-4) a value against its field's type."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} cannot be empty")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if option is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{key} must be {names}, got {value!r}")


__all__ = ["TrainConfig"]
