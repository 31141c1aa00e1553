"""LoRA and DoRA, framework-free: the settings, which linears they adapt, the initialisation, the merge rules
and the adapter as numpy. The backends' ``lora`` / ``dora`` wrappers compute what this module specifies.

LoRA (Hu et al. 2021) adds a low-rank update to a frozen linear W [out, in]:
``y = x @ W.T + scale * (dropout(x) @ A.T) @ B.T`` with A [rank, in] and B [out, rank] (PEFT's orientation:
``lora_A.weight``, ``lora_B.weight``); ``scale = alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA
(Kalajdzievski 2023). A starts as PEFT starts it, Kaiming-uniform with a = sqrt(5), which is uniform in
+-1/sqrt(in); B starts at zero, so the adapted model first computes what the base did. It fuses into the
dense weight ``W + scale * B @ A``.

DoRA (Liu et al. 2024) splits the adapted weight into a magnitude and a direction: a learned vector m [out],
started at the row norms of W, rescales each output row of the LoRA-adapted weight to that norm,
``y = (m / ||W + scale * B @ A||) * (x @ W.T + scale * (x @ A.T) @ B.T)`` (norms over each output row,
PEFT's ``lora_magnitude_vector``). As in PEFT and the paper (section 4.3) the norm is treated as a constant
in the gradient. It fuses into ``(m / ||W + scale B A||)[:, None] * (W + scale B A)``.

Names inside a backend (gemmalab.linears): the wrapped linear's dense weight is ``<linear>.base.weight``, the
adapter's ``<linear>.lora_A``, ``<linear>.lora_B`` and, for DoRA, ``<linear>.magnitude``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from .checks import is_count
from .config import Gemma3Config
from .errors import ConfigError, InputError
from .linears import check_wrappable, linears, select
from .randomness import named_rng

LORA_A, LORA_B, MAGNITUDE = "lora_A", "lora_B", "magnitude"  # a wrapper's own parameters, by these names
DEFAULT_TARGETS = ("q_proj", "v_proj")  # PEFT's and mlx-lm's default for Gemma: the queries and the values


@dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how. ``targets`` are endings of linear names (``q_proj``, ``mlp.up_proj``, a full
    name: gemmalab.linears.select); ``layers`` the blocks, as a half-open range ``(first, stop)`` (None: all)."""

    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False  # scale alpha/sqrt(rank) instead of alpha/rank
    dropout: float = 0.0  # on the adapter's input, in training only
    targets: tuple[str, ...] = DEFAULT_TARGETS
    layers: tuple[int, int] | None = None
    dora: bool = False

    def __post_init__(self) -> None:
        if not is_count(self.rank) or self.rank < 1:
            raise ConfigError(f"lora rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise ConfigError(f"lora alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"lora targets must be a non-empty list of linear names, got {self.targets!r}")
        if self.layers is not None:
            if (len(self.layers) != 2 or not all(is_count(v) for v in self.layers)
                    or not 0 <= self.layers[0] < self.layers[1]):
                raise ConfigError(f"lora layers must be a range first:stop with 0 <= first < stop, got {self.layers!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", (int(self.layers[0]), int(self.layers[1])))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scale(self) -> float:
        """The factor on B @ A: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def kind(self) -> str:
        """The wrapper that implements it (gemmalab.linears.WRAPPER_KINDS)."""
        return "dora" if self.dora else "lora"

    def linears(self, config: Gemma3Config) -> list[str]:
        """The full names of the linears this adapts in ``config``, in checkpoint order."""
        blocks = None
        if self.layers is not None:
            first, stop = self.layers
            if stop > config.num_hidden_layers:
                raise ConfigError(f"lora layers {first}:{stop} reach past this model's {config.num_hidden_layers} "
                                  f"blocks: give a range within 0:{config.num_hidden_layers}")
            blocks = range(first, stop)
        return select(config, list(self.targets), layers=blocks)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML values (what a run's config and an adapter folder record)."""
        out = asdict(self)
        out["targets"] = list(self.targets)
        out["layers"] = list(self.layers) if self.layers is not None else None
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoraConfig:
        """From the YAML form, ``{rank: 16, alpha: 32, targets: [q_proj, v_proj], layers: [4, 8]}``, or the
        text form of ``--lora`` (``parse``); one line naming an unknown key."""
        if isinstance(values, str):
            return cls.parse(values)
        if not isinstance(values, Mapping):
            raise ConfigError(f"lora settings must be a mapping such as {{rank: 16, alpha: 32}}, got {values!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown lora setting {unknown[0]!r}: the settings are {', '.join(sorted(known))}")
        kwargs = dict(values)
        if isinstance(kwargs.get("targets"), str):
            kwargs["targets"] = tuple(t.strip() for t in kwargs["targets"].split(",") if t.strip())
        if kwargs.get("layers") is not None:
            kwargs["layers"] = _layer_range(kwargs["layers"])
        return cls(**kwargs)

    @classmethod
    def parse(cls, text: str) -> LoraConfig:
        """The ``--lora`` form: comma-separated ``key=value``, where a bare word extends the list before it:
        ``rank=16,alpha=32,targets=q_proj,v_proj,layers=2:6,dora=true,rslora=true,dropout=0.05``."""
        values: dict[str, Any] = {}
        last = None
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            if "=" not in part:
                if last != "targets":
                    raise ConfigError(f"--lora {text!r}: {part!r} is not key=value (write e.g. rank=16,alpha=32,"
                                      "targets=q_proj,v_proj)")
                values["targets"].append(part)
                continue
            key, _, value = (s.strip() for s in part.partition("="))
            last = key
            values[key] = [value] if key == "targets" else _scalar(key, value)
        return cls.from_dict(values)

    def describe(self) -> str:
        """One line, in the ``--lora`` form."""
        layers = f",layers={self.layers[0]}:{self.layers[1]}" if self.layers else ""
        flags = (",rslora=true" if self.rslora else "") + (",dora=true" if self.dora else "")
        dropout = f",dropout={self.dropout:g}" if self.dropout else ""
        return f"rank={self.rank},alpha={self.alpha:g},targets={','.join(self.targets)}{layers}{dropout}{flags}"


def _scalar(key: str, value: str) -> Any:
    if key in ("rslora", "dora"):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"lora {key} must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if key == "rank":
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"lora rank must be a positive integer, got {value!r}") from None
    if key in ("alpha", "dropout"):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"lora {key} must be a number, got {value!r}") from None
    if key == "layers":
        return value
    raise ConfigError(f"unknown lora setting {key!r}: the settings are "
                      f"{', '.join(sorted(f.name for f in fields(LoraConfig)))}")


def _layer_range(value: Any) -> tuple[int, int]:
    """``"2:6"`` or ``[2, 6]`` as the range (2, 6)."""
    if isinstance(value, str):
        first, sep, stop = value.partition(":")
        try:
            if not sep:
                raise ValueError
            return int(first), int(stop)
        except ValueError:
            raise ConfigError(f"lora layers must be first:stop, e.g. 2:6, got {value!r}") from None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return tuple(value)  # type: ignore[return-value]
    raise ConfigError(f"lora layers must be first:stop or [first, stop], got {value!r}")


# --------------------------------------------------------------------------------------------------------
# The numbers: initialisation and merge rules (the specification of the backends' wrappers)
# --------------------------------------------------------------------------------------------------------
def init_a(name: str, in_features: int, rank: int, seed: int) -> np.ndarray:
    """A [rank, in] for the linear ``name``, float32: uniform in +-1/sqrt(in), which is PEFT's
    ``kaiming_uniform_(a=sqrt(5))`` (bound = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + 5))), drawn from
    ``seed`` and the linear's name."""
    bound = 1.0 / math.sqrt(in_features)
    return named_rng(seed, name + "." + LORA_A).uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)


def delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """The LoRA update of the dense weight: ``scale * B @ A`` [out, in]."""
    return scale * (np.asarray(b) @ np.asarray(a))


def lora_merge(weight: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """The dense weight a LoRA wrapper computes with: ``W + scale * B @ A``."""
    return np.asarray(weight) + delta(a, b, scale)


def row_norms(weight: np.ndarray) -> np.ndarray:
    """The L2 norm of each output row of a weight [out, in]: DoRA's magnitude of W."""
    return np.linalg.norm(np.asarray(weight), axis=1)


def dora_merge(weight: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, magnitude: np.ndarray) -> np.ndarray:
    """The dense weight a DoRA wrapper computes with: ``(m / ||W + scale B A||)[:, None] * (W + scale B A)``."""
    adapted = lora_merge(weight, a, b, scale)
    return (np.asarray(magnitude) / row_norms(adapted))[:, None] * adapted


def check_lora_arrays(a: object, b: object, in_features: int, out_features: int, magnitude: object = None
                      ) -> tuple[np.ndarray, ...]:
    """A [rank, in], B [out, rank] (and a DoRA magnitude [out] when given) as float32 numpy, after checking
    their shapes against the linear and that they are finite: what every backend's wrapper is built from."""
    arrays = [np.asarray(a), np.asarray(b)] + ([] if magnitude is None else [np.asarray(magnitude)])
    rank = arrays[0].shape[0] if arrays[0].ndim == 2 else -1
    wanted = [(rank, in_features), (out_features, rank), (out_features,)]
    for part, array, shape in zip((LORA_A, LORA_B, MAGNITUDE), arrays, wanted, strict=False):  # no magnitude: LoRA
        if tuple(array.shape) != shape or rank < 1:
            raise InputError(f"{part} is {tuple(array.shape)}, but a linear {in_features} -> {out_features} "
                             f"needs lora_A [rank, {in_features}], lora_B [{out_features}, rank], magnitude "
                             f"[{out_features}]")
    out = []
    for part, array in zip((LORA_A, LORA_B, MAGNITUDE), arrays, strict=False):
        if array.dtype.kind in "biuOSUc":  # floats, and bfloat16 (ml_dtypes, kind V), are fine
            raise InputError(f"{part} must hold real floating-point numbers, got {array.dtype}")
        values = array.astype(np.float32)
        if not np.isfinite(values).all():
            raise InputError(f"{part} holds NaN or inf")
        out.append(values)
    return tuple(out)


@dataclass
class Adapter:
    """A LoRA or DoRA adapter as numpy: its settings and, per adapted linear (full name), ``lora_A`` [rank, in],
    ``lora_B`` [out, rank] and, for DoRA, ``magnitude`` [out]. What the adapter formats read and write and what
    a backend's wrappers are built from."""

    config: LoraConfig
    tensors: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def check(self, model: Gemma3Config) -> Adapter:
        """Itself, after checking each tensor's shape against ``model`` (one line naming the first wrong one)."""
        specs = linears(model)
        wanted = {LORA_A, LORA_B, MAGNITUDE} if self.config.dora else {LORA_A, LORA_B}
        if not self.tensors:
            raise InputError("the adapter adapts no linear")
        for name, parts in self.tensors.items():
            spec = specs.get(name)
            if spec is None or spec.tied:
                raise InputError(f"the adapter adapts {name!r}, which is no linear of this model "
                                 f"({model.name}): it was made for another model")
            if set(parts) != wanted:
                raise InputError(f"the adapter's {name} holds {sorted(parts)}, not {sorted(wanted)}")
            shapes = {LORA_A: (self.config.rank, spec.in_features), LORA_B: (spec.out_features, self.config.rank),
                      MAGNITUDE: (spec.out_features,)}
            for part, array in parts.items():
                if tuple(np.shape(array)) != shapes[part]:
                    raise InputError(f"the adapter's {name}.{part} is {tuple(np.shape(array))}, but this model "
                                     f"({model.name}) at rank {self.config.rank} needs {shapes[part]}")
        return self

    def merged(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``weights`` (canonical dense tensors by name) with each adapted linear's weight merged (float32)."""
        out = dict(weights)
        for name, parts in self.tensors.items():
            weight = np.asarray(weights[name + ".weight"], np.float32)
            if self.config.dora:
                merged = dora_merge(weight, parts[LORA_A], parts[LORA_B], self.config.scale, parts[MAGNITUDE])
            else:
                merged = lora_merge(weight, parts[LORA_A], parts[LORA_B], self.config.scale)
            out[name + ".weight"] = merged.astype(np.float32)
        return out


def fresh_adapter(config: LoraConfig, model: Gemma3Config, seed: int,
                  weights: Mapping[str, np.ndarray] | None = None) -> Adapter:
    """A new adapter for ``model``: A drawn (init_a), B zero and, for DoRA, the magnitude at the row norms of
    the base ``weights`` (required then: canonical dense tensors by name)."""
    specs = linears(model)
    tensors = {}
    for name in config.linears(model):
        spec = specs[name]
        parts = {LORA_A: init_a(name, spec.in_features, config.rank, seed),
                 LORA_B: np.zeros((spec.out_features, config.rank), np.float32)}
        if config.dora:
            if weights is None:
                raise InputError("a DoRA adapter starts from the base weights' row norms: give the weights")
            parts[MAGNITUDE] = row_norms(np.asarray(weights[name + ".weight"], np.float32)).astype(np.float32)
        tensors[name] = parts
    return Adapter(config, tensors)


def with_tensors(adapter: Adapter, tensors: Mapping[str, Mapping[str, np.ndarray]]) -> Adapter:
    """A copy of ``adapter`` holding ``tensors`` instead (its settings kept)."""
    return replace(adapter, tensors={n: dict(p) for n, p in tensors.items()})


# --------------------------------------------------------------------------------------------------------
# Attaching an adapter to a backend's model and reading it back (through the Backend protocol)
# --------------------------------------------------------------------------------------------------------
def wrap_adapter(backend: Any, native: Any, model: Gemma3Config, adapter: Adapter, *,
                 dropout: float | None = None) -> list[str]:
    """Wrap each linear ``adapter`` adapts in the backend's ``native`` model with its LoRA or DoRA wrapper
    (dropout: the adapter's own rate unless given); returns their names. Every name and shape is checked
    before the first wrap, so bad input leaves the model as it was."""
    adapter.check(model)
    names = check_wrappable(model, list(adapter.tensors))
    settings = adapter.config
    rate = settings.dropout if dropout is None else dropout
    for name in names:
        backend.wrap(native, [name], settings.kind, scale=settings.scale, dropout=rate, **adapter.tensors[name])
    return names


def adapter_parameter_names(settings: LoraConfig, names: Iterable[str]) -> list[str]:
    """The backend parameter names of an adapter on the linears ``names``: ``<linear>.lora_A`` ... ."""
    parts = (LORA_A, LORA_B, MAGNITUDE) if settings.dora else (LORA_A, LORA_B)
    return [f"{name}.{part}" for name in names for part in parts]


def attached_adapter(backend: Any, native: Any, settings: LoraConfig, names: Iterable[str]) -> Adapter:
    """The adapter on the linears ``names`` of the backend's ``native`` model, as numpy float32."""
    names = list(names)
    held = backend.parameters(native, adapter_parameter_names(settings, names))
    tensors: dict[str, dict[str, np.ndarray]] = {name: {} for name in names}
    for key, value in held.items():
        linear, _, part = key.rpartition(".")
        tensors[linear][part] = np.asarray(value, np.float32)
    return Adapter(settings, tensors)


__all__ = [
    "DEFAULT_TARGETS",
    "LORA_A",
    "LORA_B",
    "MAGNITUDE",
    "Adapter",
    "adapter_parameter_names",
    "attached_adapter",
    "wrap_adapter",
    "LoraConfig",
    "check_lora_arrays",
    "delta",
    "dora_merge",
    "fresh_adapter",
    "init_a",
    "lora_merge",
    "row_norms",
    "with_tensors",
]
