"""A training run's configuration: one typed dataclass, read from YAML and overridden key by key.

Every field is a flat key, the same in the YAML file, in ``--set key=value`` and (for the common ones) in a
``gemmalab train`` flag; each carries its meaning (``gemmalab train --list-settings`` prints them all).
Precedence: defaults < a resumed run's saved settings < ``--config FILE.yaml`` < ``--set`` < flags, so
``gemmalab train --out DIR --resume`` alone continues a run as it was configured. Optional settings take
``none`` (or ``null``) for "unset".
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..errors import ConfigError
from ..lora import LoraConfig
from ..quantize import check_options
from .losses import CrossEntropy, LossSpec
from .schedules import SCHEDULES
from .spec import LOSS_CHUNK_TOKENS, OptimizerSpec, TrainSpec

QUANTIZE_CHOICES = {"q4": 4, "q8": 8}  # the quantize setting's values: bits of the frozen base's linears


def _setting(default: Any, meaning: str) -> Any:
    """A field with its one-line meaning, shown by ``gemmalab train --list-settings`` and in ``--help``."""
    return dataclasses.field(default=default, metadata={"help": meaning})


@dataclass(frozen=True)
class TrainConfig:
    # The command whose settings these are, for error messages (a subclass such as DistillConfig names its own).
    command: ClassVar[str] = "gemmalab train"
    model_flag: ClassVar[str] = "--model"  # the flag that names the checkpoint trained (distill: --student)

    # what to train
    preset: str | None = _setting("tiny", "random init from this preset (byte-level tokenizer); ignored with model")
    model: str | None = _setting(None, "fine-tune this checkpoint folder or Hub repo id (its own tokenizer)")
    data: str | None = _setting(None, "text file, .jsonl (text, chat messages or prompt/completion) or folder; "
                                      "none = the embedded corpus")
    backend: str | None = _setting(None, "mlx, torch or jax; none = $GEMMALAB_BACKEND, else auto")
    device: str | None = _setting(None, "cuda:0, mps, cpu, ...; none = the backend's best")
    seed: int = _setting(0, "seed of the random init, the data order and the held-out split")
    # how long and how big
    steps: int = _setting(1000, "optimizer steps of the run (changing it on --resume needs --extend)")
    batch_size: int = _setting(8, "sequences per micro-batch")
    grad_accum: int = _setting(1, "micro-batches per optimizer step")
    seq_len: int = _setting(256, "tokens per training sequence")
    # optimizer and schedule
    optimizer: str = _setting("adamw", "adamw or adafactor")
    lr: float = _setting(1e-4, "peak learning rate")
    min_lr: float = _setting(0.0, "learning rate at the end of a linear or cosine schedule")
    schedule: str = _setting("cosine", "constant, linear or cosine (after the warmup)")
    warmup_steps: int = _setting(1000, "linear warmup steps (capped at a tenth of a run shorter than twice this)")
    weight_decay: float = _setting(0.01, "decoupled weight decay (AdamW) or its Adafactor equivalent")
    beta1: float = _setting(0.9, "AdamW first-moment decay")
    beta2: float = _setting(0.999, "AdamW second-moment decay")
    eps: float = _setting(1e-8, "AdamW epsilon")
    adafactor_decay_rate: float = _setting(0.8, "Adafactor second-moment decay exponent")
    adafactor_clip_threshold: float = _setting(1.0, "Adafactor update clipping threshold")
    adafactor_eps1: float = _setting(1e-30, "Adafactor epsilon added to squared gradients")
    adafactor_eps2: float = _setting(1e-3, "Adafactor floor of the parameter scale")
    max_grad_norm: float | None = _setting(1.0, "clip the global gradient norm to this; none = no clipping")
    layer_lr_decay: float = _setting(1.0, "block i of L trains at decay^(L-1-i) times lr (1 = off)")
    unfreeze_every: int = _setting(0, "progressive unfreezing: add unfreeze_blocks blocks every this many steps "
                                      "(0 = off)")
    unfreeze_blocks: int = _setting(1, "blocks unfrozen at the start and at each unfreezing step")
    lora: str | dict | None = _setting(None, "train a LoRA (or DoRA) adapter on the frozen model instead of the model: "
                                             "rank=16,alpha=32,targets=q_proj,v_proj[,layers=2:6][,dropout=0.05]"
                                             "[,rslora=true][,dora=true] (YAML: a mapping); needs --model")
    quantize: str | None = _setting(None, "with lora: hold the frozen model's block linears quantized, q4 or q8 "
                                          "(QLoRA; the adapter trains in full precision); none = as loaded")
    quantize_group_size: int = _setting(64, "with quantize: weights per scale and bias, 32, 64 or 128")
    # loss, precision, memory
    label_smoothing: float = _setting(0.0, "label smoothing of the cross-entropy, in [0, 1)")
    loss_chunk_tokens: int = _setting(LOSS_CHUNK_TOKENS, "positions per chunk of the output head and loss")
    precision: str = _setting("fp32", "fp32, bf16 (fp32 master weights) or fp16 (with loss scaling); --dtype sets it")
    grad_checkpointing: bool = _setting(False, "recompute each block in the backward pass to save memory")
    loss_scale: float = _setting(2.0**15, "fp16 only: the initial dynamic loss scale")
    # data split, evaluation, logging, checkpoints
    eval_fraction: float = _setting(0.02, "seeded fraction of the packed windows held out for evaluation")
    max_train_windows: int | None = _setting(None, "train on at most this many windows, a seeded sample of those left after "
                                               "the held-out split (a data-limited run); none = all")
    eval_every: int = _setting(0, "evaluate every this many steps (0 = only at the end)")
    eval_batches: int = _setting(8, "held-out batches per evaluation")
    log_every: int = _setting(10, "steps between metrics records and progress lines")
    out: str = _setting("runs/train", "run folder: config.yaml, metrics.jsonl, tensorboard/, checkpoints/")
    checkpoint_every: int = _setting(0, "steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = _setting(3, "newest checkpoints kept (0 = all)")
    resume: bool = _setting(False, "continue the run in out from its last checkpoint")
    extend: bool = _setting(False, "with resume: train to a larger steps, the extra steps as a new schedule cycle")
    tensorboard: bool = _setting(True, "write TensorBoard event files to out/tensorboard")
    aim: bool = _setting(True, "log to Aim when the aim package is installed")

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "loss_chunk_tokens", "log_every", "unfreeze_blocks",
                    "eval_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "keep_checkpoints", "unfreeze_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_train_windows is not None and self.max_train_windows < 1:
            raise ConfigError(f"max_train_windows must be at least 1, or none for all windows, got {self.max_train_windows}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm must be positive, or none for no clipping, got {self.max_grad_norm}")
        if self.extend and not self.resume:
            raise ConfigError("extend continues a run: use it with --resume (and a larger --steps)")
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
        if self.lora is not None:
            settings = LoraConfig.from_dict(self.lora)
            if self.model is None:
                raise ConfigError(f"lora adapts a trained model: give {self.model_flag} SOURCE (a checkpoint folder or "
                                  "Hub id)")
            object.__setattr__(self, "lora", settings.describe())  # one canonical form, in config.yaml too
        if self.quantize is not None:
            if self.quantize not in QUANTIZE_CHOICES:
                raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} (or none), got {self.quantize!r}")
            if self.lora is None:
                raise ConfigError("quantize freezes the model: train an adapter over it with --lora (QLoRA); a "
                                  "quantized model cannot be trained itself")
            check_options(QUANTIZE_CHOICES[self.quantize], self.quantize_group_size)

    @property
    def quantize_bits(self) -> int | None:
        """4 or 8 with ``quantize``, else None."""
        return None if self.quantize is None else QUANTIZE_CHOICES[self.quantize]

    @property
    def lora_config(self) -> LoraConfig | None:
        """The adapter's settings, or None for full training."""
        return None if self.lora is None else LoraConfig.parse(self.lora)

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
            loss=LossSpec(head=(CrossEntropy(label_smoothing=self.label_smoothing),)),
            loss_chunk_tokens=self.loss_chunk_tokens,
            grad_checkpointing=self.grad_checkpointing,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def settings(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, meaning) of every setting, in the order of the dataclass."""
        hints = typing.get_type_hints(cls)
        return [(f.name, _type_name(hints[f.name]), f.default, f.metadata["help"]) for f in fields(cls)]

    @classmethod
    def default(cls, name: str) -> Any:
        return next(f.default for f in fields(cls) if f.name == name)

    @classmethod
    def meaning(cls, name: str) -> str:
        """The setting's meaning and default, for a command-line flag's help."""
        value = cls.default(name)
        shown = "none" if value is None else str(value).lower() if isinstance(value, bool) else value
        return f"{next(f.metadata['help'] for f in fields(cls) if f.name == name)} (default: {shown})"

    # -- reading and overriding ----------------------------------------------------------------------------
    @classmethod
    def from_sources(cls, file: str | Path | None = None, sets: list[str] | None = None,
                     flags: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> TrainConfig:
        """Defaults, then ``base`` (a resumed run's own settings), then a YAML file, then ``key=value``
        strings, then explicit flag values (None = unset)."""
        values: dict[str, Any] = dict(base or {})
        if file is not None:
            values.update(cls.flatten(read_yaml_mapping(Path(file))))
        for item in sets or []:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r} is not key=value: write e.g. --set lr=3e-4")
            values.update(cls.flatten({key.strip(): yaml.safe_load(raw) if raw.strip() else None}))
        values.update({k: v for k, v in (flags or {}).items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def flatten(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Settings as written in a YAML file or a ``--set`` key, as flat field names: the identity here; a
        config with YAML sections (DistillConfig) maps ``section: {key: value}`` and ``section.key``."""
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            close = [m for name in unknown for m in difflib.get_close_matches(name, known, n=1)]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}{hint}: `{cls.command} --list-settings` lists them all"
            )
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file holding a mapping (a config), or one ConfigError line saying what is wrong with it."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML ({err}): fix the file") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of setting: value")
    return loaded


NONE_WORDS = ("none", "null", "~")


def _type_name(hint: Any) -> str:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    names = [getattr(o, "__name__", str(o)) for o in options if o is not type(None)]
    return " or ".join(names) + (" or none" if type(None) in options else "")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check (and gently convert: 1 -> 1.0, '3e-4' -> 3e-4) a value against its field's type."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if isinstance(value, str) and value.strip().lower() in NONE_WORDS and type(None) in options:
        value = None  # `--set max_grad_norm=none`: YAML reads null and ~ as None, but not the word none
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} needs a value: it cannot be none")
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
        if option is dict and isinstance(value, dict):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{key} must be {names}, got {value!r}")


__all__ = ["TrainConfig"]
