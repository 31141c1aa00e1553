"""A distillation run's configuration: every training setting (gemmalab.train.TrainConfig) plus the teacher
and the distillation objective, in one typed dataclass.

In YAML the settings may be grouped in four sections (experiments/configs/distill.yaml)::

    teacher:      {model: SRC, dtype: bfloat16}
    student:      {preset: gemma-3-270m}          # or {model: SRC}
    training:     {steps: 2000, lr: 3.0e-4, ...}  # any gemmalab train setting
    distillation: {loss: fkl, alpha: 0.5, temperature: 2.0, ...}

and the same keys work flat (``alpha: 0.5``) and dotted on the command line (``--set distillation.alpha=0.7``
or ``--set alpha=0.7``). A run saves its settings flat, so ``--resume`` refuses to continue it under another
teacher or objective (every setting here but the run-length ones is part of what the run is).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

from ..config import Gemma3Config
from ..errors import ConfigError
from ..train.config import TrainConfig, _setting
from ..train.losses import (
    DIVERGENCES,
    HIDDEN_METRICS,
    AttentionTransfer,
    HiddenStateTransfer,
    LossSpec,
    cached_distillation_loss,
    distillation_loss,
)
from ..train.schedules import SCHEDULES as VALUE_SCHEDULES
from ..train.spec import TrainSpec
from .mapping import layer_mapping

# YAML section -> {key in that section: the flat setting}. The training section takes every TrainConfig key as
# it is; `student` names the model being trained, which TrainConfig calls preset / model.
SECTIONS: dict[str, dict[str, str]] = {
    "teacher": {"model": "teacher", "dtype": "teacher_dtype", "cache": "cache"},
    "student": {"model": "model", "preset": "preset"},
    "distillation": {"loss": "loss", "alpha": "alpha", "beta": "beta", "temperature": "temperature",
                     "temperature_end": "temperature_end", "temperature_schedule": "temperature_schedule",
                     "t2_scaling": "t2_scaling", "mapping": "mapping", "hidden_weight": "hidden_weight",
                     "hidden_loss": "hidden_loss", "attention_weight": "attention_weight",
                     "attention_temperature": "attention_temperature", "attention_chunk": "attention_chunk",
                     "layer_figures": "layer_figures", "lmbda": "lmbda", "seq_kd": "seq_kd",
                     "max_new_tokens": "max_new_tokens", "gen_temperature": "gen_temperature"},
}
TRAINING_SECTION = "training"
# The per-step scalar the Distillation term reads its temperature from (a schedule, one value per step).
TEMPERATURE_SCALAR = "temperature"
TEACHER = "teacher"  # the companion name of the teacher model in the loss spec


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    command: ClassVar[str] = "gemmalab distill"
    model_flag: ClassVar[str] = "--student"

    # the teacher
    teacher: str | None = _setting(None, "the teacher: a checkpoint folder or Hub repo id (or give cache)")
    cache: str | None = _setting(None, "train from this offline teacher cache (gemmalab distill cache) instead of "
                                       "a teacher in memory")
    teacher_dtype: str | None = _setting(None, "the teacher's dtype: float32, bfloat16 or float16; none = the "
                                               "checkpoint's own")
    # the objective: loss = alpha * CE(targets) + (1 - alpha) * KD(teacher || student)
    loss: str = _setting("fkl", "the distillation divergence: fkl (KL(teacher||student)), rkl (reverse KL), jsd "
                                "(generalized Jensen-Shannon with beta) or tvd (total variation)")
    alpha: float = _setting(0.5, "weight of the hard-label cross-entropy; the divergence gets 1 - alpha")
    beta: float = _setting(0.5, "jsd only: the mixture weight (0 = forward KL, 1 = reverse KL, TRL's convention)")
    temperature: float = _setting(2.0, "distillation temperature T of both distributions (apart from any "
                                       "sampling temperature); the start value of a schedule")
    temperature_end: float | None = _setting(None, "the temperature at the last step; none = the same as "
                                                   "temperature")
    temperature_schedule: str = _setting("constant", "constant, linear or cosine from temperature to "
                                                     "temperature_end over the run")
    t2_scaling: bool = _setting(True, "multiply the divergence by T^2 (keeps its gradient's scale independent of T)")
    # feature transfer on mapped layer pairs: + hidden_weight * hidden loss + attention_weight * attention KL
    mapping: str = _setting("uniform", "which teacher block each student block learns from: uniform, last, "
                                       "progressive, by-type, or a list (s:t,s:t,... or t0,t1,...)")
    hidden_weight: float = _setting(0.0, "weight of the hidden-state transfer, shared evenly by the mapped pairs "
                                         "(0 = off)")
    hidden_loss: str = _setting("cosine", "the hidden-state transfer: cosine (1 - cosine similarity) or mse, through "
                                          "a learned projection when the widths differ")
    attention_weight: float = _setting(0.0, "weight of the attention-map transfer (KL of attention rows), shared "
                                            "evenly by the mapped pairs (0 = off)")
    attention_temperature: float = _setting(1.0, "temperature of both models' attention rows in the attention "
                                                 "transfer")
    attention_chunk: int = _setting(128, "the attention transfer's query rows per chunk (memory: one chunk's "
                                         "[batch, heads, rows, tokens] at a time)")
    # on-policy and sequence-level batches (GKD; gemmalab.distill.onpolicy)
    lmbda: float = _setting(0.0, "GKD's lambda: the probability that a batch's responses are sampled from the "
                                 "student itself (on-policy); 0 = off")
    seq_kd: bool = _setting(False, "GKD's seq_kd: the teacher writes the responses of the batches the student "
                                   "does not (sequence-level KD)")
    max_new_tokens: int = _setting(64, "the most tokens the student or teacher writes per row of such a batch")
    gen_temperature: float = _setting(1.0, "sampling temperature of those responses (0 = greedy)")
    layer_figures: bool = _setting(False, "at each evaluation also the hidden-state cosine and attention KL of each "
                                          "mapped pair (always on with hidden or attention transfer)")
    out: str = _setting("runs/distill", "run folder: config.yaml, metrics.jsonl, report.json, curves.png, "
                                        "checkpoints/")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.teacher and not self.cache:
            raise ConfigError("distillation needs a teacher: pass --teacher SRC (a checkpoint folder or Hub id) or "
                              "--cache DIR (an offline teacher cache)")
        if self.teacher and self.cache:
            raise ConfigError("give the teacher once: --teacher SRC (online) or --cache DIR (offline), not both")
        if self.cache and (self.loss != "fkl" or self.scheduled_temperature):
            raise ConfigError("a teacher cache holds the teacher's distribution at one temperature, for the forward "
                              "KL: train from it with loss fkl and a constant temperature, or use --teacher SRC")
        if self.loss not in DIVERGENCES:
            raise ConfigError(f"loss {self.loss!r} is not one of {', '.join(DIVERGENCES)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta must be in [0, 1], got {self.beta}")
        for name in ("temperature", "temperature_end"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.temperature_schedule not in VALUE_SCHEDULES:
            raise ConfigError(f"temperature_schedule {self.temperature_schedule!r} is not one of "
                              f"{', '.join(VALUE_SCHEDULES)}")
        if self.teacher_dtype is not None and self.teacher_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"teacher_dtype {self.teacher_dtype!r} is not one of float32, bfloat16, float16")
        for name in ("hidden_weight", "attention_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.hidden_loss not in HIDDEN_METRICS:
            raise ConfigError(f"hidden_loss {self.hidden_loss!r} is not one of {', '.join(HIDDEN_METRICS)}")
        if not self.attention_temperature > 0:
            raise ConfigError(f"attention_temperature must be positive, got {self.attention_temperature}")
        if not (isinstance(self.attention_chunk, int) and self.attention_chunk >= 1):
            raise ConfigError(f"attention_chunk must be a whole number >= 1, got {self.attention_chunk!r}")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"lmbda must be in [0, 1], got {self.lmbda}")
        if self.lmbda > 0 and self.alpha > 0:
            raise ConfigError(f"on-policy batches (lmbda {self.lmbda}) train on the divergence alone, as GKD does: "
                              "set alpha 0 (a cross-entropy would fit the student's own samples)")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ConfigError(f"max_new_tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        if not self.gen_temperature >= 0:
            raise ConfigError(f"gen_temperature must be >= 0, got {self.gen_temperature}")
        if self.cache and (self.lmbda > 0 or self.seq_kd):
            raise ConfigError("on-policy and sequence-level batches need the teacher itself, not a cache: pass "
                              "--teacher SRC, or set lmbda 0 and seq_kd false")
        if self.cache and self.transfers_features:
            raise ConfigError("a teacher cache holds the teacher's output distribution only: hidden-state and attention "
                              "transfer need the teacher itself (--teacher SRC), or set hidden_weight and "
                              "attention_weight to 0")

    @property
    def scheduled_temperature(self) -> bool:
        """Whether the temperature changes over the run (then it reaches the loss as a per-step scalar)."""
        return self.temperature_end is not None and self.temperature_end != self.temperature \
            and self.temperature_schedule != "constant"

    @property
    def transfers_features(self) -> bool:
        """Whether the run has hidden-state or attention transfer terms."""
        return self.hidden_weight > 0 or self.attention_weight > 0

    def loss_spec(self, cached: str | None = None, student: Gemma3Config | None = None,
                  teacher: Gemma3Config | None = None) -> LossSpec:
        """The objective's loss; ``cached`` ("top-k" or "sampled") for a run from a teacher cache of that kind.
        Feature transfer needs the two models' configs (the mapping and the projections' widths)."""
        if cached is not None:
            return cached_distillation_loss(alpha=self.alpha, estimator=cached, temperature=self.temperature,
                                            label_smoothing=self.label_smoothing, t2_scaling=self.t2_scaling)
        logits = distillation_loss(
            alpha=self.alpha, temperature=self.temperature, divergence=self.loss, beta=self.beta,
            label_smoothing=self.label_smoothing, t2_scaling=self.t2_scaling, teacher=TEACHER,
            temperature_input=TEMPERATURE_SCALAR if self.scheduled_temperature else None,
        )
        if not self.transfers_features:
            return logits
        if student is None or teacher is None:
            raise ConfigError("hidden-state and attention transfer need the student's and the teacher's configs")
        return replace(logits, transfer=transfer_terms(self, student, teacher))

    def train_spec(self, cached: str | None = None, student: Gemma3Config | None = None,
                   teacher: Gemma3Config | None = None) -> TrainSpec:
        return replace(super().train_spec(), loss=self.loss_spec(cached, student, teacher))

    @classmethod
    def flatten(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Sections and dotted keys as flat settings (see the module docstring); flat keys pass through."""
        flat: dict[str, Any] = {}
        for key, value in values.items():
            section, dot, sub = key.partition(".")
            if dot:  # --set distillation.alpha=0.7
                flat.update(cls.flatten({section: {sub: value}}))
            elif key == TRAINING_SECTION and isinstance(value, dict):
                flat.update(value)
            elif key in SECTIONS and isinstance(value, dict):
                table = SECTIONS[key]
                for name, item in value.items():
                    if name not in table:
                        raise ConfigError(f"the {key} section has no setting {name!r}: it takes "
                                          f"{', '.join(table)}")
                    flat[table[name]] = item
            elif key in (TRAINING_SECTION, *SECTIONS) and key not in {f.name for f in fields(cls)}:
                raise ConfigError(f"{key} must be a section of settings ({key}: {{key: value}}), got {value!r}")
            else:
                flat[key] = value
        return flat


def projection_name(student_layer: int) -> str:
    """The loss parameter that projects student block ``student_layer``'s hidden state to the teacher's width."""
    return f"hidden_projection.{student_layer}"


def transfer_terms(config: DistillConfig, student: Gemma3Config, teacher: Gemma3Config) -> tuple:
    """The hidden-state and attention transfer terms of ``config`` on the pairs of its layer mapping, each
    weight shared evenly by the pairs. A pair (student block s, teacher block t) compares the outputs of the
    two blocks, hidden states s + 1 and t + 1 in transformers' index (the last is after the final norm), and
    the attention rows of the two blocks; a projection bridges the widths when they differ."""
    pairs = layer_mapping(student, teacher, config.mapping)
    project = student.hidden_size != teacher.hidden_size
    terms: list = []
    if config.hidden_weight > 0:
        terms += [HiddenStateTransfer(p.student_layer + 1, p.teacher_layer + 1, metric=config.hidden_loss,
                                      projection=projection_name(p.student_layer) if project else None,
                                      teacher=TEACHER, weight=config.hidden_weight / len(pairs)) for p in pairs]
    if config.attention_weight > 0:
        terms += [AttentionTransfer(p.student_layer, p.teacher_layer, temperature=config.attention_temperature,
                                    teacher=TEACHER, query_chunk=config.attention_chunk,
                                    weight=config.attention_weight / len(pairs)) for p in pairs]
    return tuple(terms)


def losses_applied(config: DistillConfig) -> str:
    """What the transfer terms put on each mapped pair, as the mapping table shows it."""
    applied = ([f"hidden {config.hidden_loss}"] if config.hidden_weight > 0 else []) + \
              (["attention KL"] if config.attention_weight > 0 else [])
    return " + ".join(applied) or "none (hidden_weight, attention_weight 0)"


__all__ = ["SECTIONS", "TEACHER", "TEMPERATURE_SCALAR", "DistillConfig", "losses_applied", "projection_name",
           "transfer_terms"]
