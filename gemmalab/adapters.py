"""Adapter files on disk: a LoRA or DoRA adapter (gemmalab.lora.Adapter) read from and written in the two
formats people exchange, PEFT's and mlx-lm's, and merged into a base checkpoint.

**PEFT** (what ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained`` loads):

    adapter_config.json        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r", "lora_alpha", "lora_dropout",
                                "target_modules", "layers_to_transform", "use_rslora", "use_dora", "bias": "none",
                                "fan_in_fan_out": false, "modules_to_save": null, ...}
    adapter_model.safetensors  base_model.model.<linear>.lora_A.weight      [rank, in]
                               base_model.model.<linear>.lora_B.weight      [out, rank]
                               base_model.model.<linear>.lora_magnitude_vector  [out]  (DoRA; no ".weight")

``<linear>`` is the module path in transformers' ``Gemma3ForCausalLM`` (``model.layers.3.self_attn.q_proj``,
``lm_head``), the canonical name here. PEFT adapts a linear when its path is in ``target_modules`` or ends with
"." + an entry (gemmalab.linears.select's rule), and, for a suffix match only, when its block is in
``layers_to_transform``; the scale is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``). Where a
LoraConfig's targets and layers cannot be said that way (a full name with a layer range, a head with a layer
range), the config lists the exact module paths instead, which PEFT matches as they are.

**mlx-lm** (what ``mlx_lm.lora`` writes and ``mlx_lm.load(..., adapter_path=)`` loads, through
``mlx_lm.tuner.utils.load_adapters`` and ``linear_to_lora_layers``):

    adapter_config.json   {"fine_tune_type": "lora" | "dora", "num_layers": N,
                           "lora_parameters": {"rank", "scale", "dropout", "keys": [...]}} (mlx-lm adds its
                           training arguments, which loading ignores)
    adapters.safetensors  <linear>.lora_a  [in, rank]   (A transposed)
                          <linear>.lora_b  [rank, out]  (B transposed)
                          <linear>.m       [out]        (DoRA's magnitude)

mlx-lm wraps, in each of the last ``num_layers`` blocks (0 or less: every block), the linears whose path
inside the block (``self_attn.q_proj``) is in ``keys`` (no keys: every linear of a block), and at model level
those whose full path is (``lm_head``). ``scale`` is the factor itself (a LoraConfig's ``scale``); read back,
alpha is ``scale * rank`` and rsLoRA off. mlx-lm's DoRA computes what PEFT's does at inference (and with no
dropout): ``m / ||W + scale B A||`` (row norms, the norm a constant in the gradient) times the LoRA output, so
the tensors carry over as they are. (Training with dropout they differ: mlx-lm rescales ``W x + s B A drop(x)``,
PEFT ``W x`` unscaled plus ``(m/n - 1) W drop(x) + (m/n) s B A drop(x)``.) It loads with ``strict=False`` after checking every
tensor of the file names a wrapped parameter of the right shape: a linear it wraps that the file lacks keeps its
initial ``lora_b = 0`` (and DoRA ``m = ||W||``) and computes what the base does. So an adapter whose linears
the config cannot name exactly is written with ``keys`` the union of its linears' paths in a block and
``num_layers`` counting from its lowest adapted block to the top; the top is the base model's block count
(``model``), known without it only when the adapter adapts every block.

Writes are atomic: a new folder is written beside its place and renamed into it; replacing an adapter
(``overwrite``) replaces each file atomically. A folder holding anything but an adapter of the format being
written is never written into.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint
from .checks import is_count
from .config import Gemma3Config
from .errors import ConfigError, GemmalabError, InputError
from .linears import HEAD, linears
from .lora import LORA_A, LORA_B, MAGNITUDE, Adapter, LoraConfig, with_tensors
from .outputs import check_writable_folder, writing
from .params import layer_prefix

PEFT, MLX = "peft", "mlx"
FORMATS = (PEFT, MLX)
CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
MLX_WEIGHTS = "adapters.safetensors"
FILES = {PEFT: (CONFIG_FILE, PEFT_WEIGHTS), MLX: (CONFIG_FILE, MLX_WEIGHTS)}
LABELS = {PEFT: "PEFT", MLX: "mlx-lm"}
WHAT_IS_AN_ADAPTER = (f"a PEFT adapter folder ({CONFIG_FILE} + {PEFT_WEIGHTS}) or an mlx-lm one "
                      f"({CONFIG_FILE} + {MLX_WEIGHTS})")

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
PEFT_PARTS = {"lora_A.weight": LORA_A, "lora_B.weight": LORA_B, "lora_magnitude_vector": MAGNITUDE}
MLX_PARTS = {"lora_a": LORA_A, "lora_b": LORA_B, "m": MAGNITUDE}

# The linears of a block by their path inside it, in checkpoint order ("self_attn.q_proj" ... "mlp.down_proj"),
# read off the parameter layout rather than written out again.
BLOCK_LINEARS = tuple(spec.name.removeprefix(layer_prefix(0))
                      for spec in linears(Gemma3Config.preset("tiny")).values() if spec.layer == 0)

# PEFT options and what gemmalab makes of them. Options not named here must be off (None, false, empty):
# a value that is not is refused, since it could change what the adapter computes.
_PEFT_IGNORED = {  # metadata, or options that only shape how PEFT finds or initialises what the file holds
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "megatron_core", "qalora_group_size", "ensure_weight_tying", "exclude_modules",
    "target_modules", "layers_pattern", "layers_to_transform", "r", "lora_alpha", "lora_dropout", "use_rslora",
    "use_dora", "init_lora_weights", "eva_config", "corda_config", "lora_ga_config", "loftq_config",
    "bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
}
# init_lora_weights values after which the adapter belongs to a changed base (PiSSA, OLoRA, CorDA and LoRA-GA
# subtract their start from the base weights; LoftQ quantizes them): PEFT converts such an adapter to plain LoRA
# when saved with path_initial_model_for_weight_conversion.
_PEFT_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
_MLX_FINE_TUNE_TYPES = ("lora", "dora")
_MLX_LORA_PARAMETERS = {"rank", "scale", "dropout", "keys"}


# --------------------------------------------------------------------------------------------------------
# Names: which linears a config picks, in each tool's rule
# --------------------------------------------------------------------------------------------------------
def _block_of(name: str) -> int | None:
    """The block of a block linear's path, None for the head."""
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


def _is_linear(name: str) -> bool:
    """A path naming a linear gemmalab adapts: a block's (``model.layers.3.mlp.up_proj``) or the head."""
    if name == HEAD:
        return True
    parts = name.split(".", 3)
    return (len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
            and str(int(parts[2])) == parts[2] and parts[3] in BLOCK_LINEARS)


def _order(name: str) -> tuple[int, int]:
    """Checkpoint order: blocks in turn, q k v o gate up down in each, the head last."""
    block = _block_of(name)
    if block is None:
        return (math.inf, 0)  # type: ignore[return-value]
    return (block, BLOCK_LINEARS.index(name.split(".", 3)[3]))


def _ordered(tensors: Mapping[str, dict]) -> dict[str, dict]:
    return {name: tensors[name] for name in sorted(tensors, key=_order)}


def _universe(top: int) -> list[str]:
    """Every linear that can be adapted in a model of ``top`` blocks (with an untied head: where it is tied,
    no adapter holds it, and nothing here needs to know)."""
    return [f"{layer_prefix(block)}{path}" for block in range(top) for path in BLOCK_LINEARS] + [HEAD]


def _ends_with(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # gemmalab.linears.select's rule, and PEFT's


def _gemmalab_picks(targets: Iterable[str], layers: tuple[int, int] | None, top: int) -> set[str]:
    """What LoraConfig(targets, layers).linears(model) gives in a model of ``top`` blocks."""
    targets = list(targets)
    picked = {n for n in _universe(top) if any(_ends_with(n, t) for t in targets)}
    if layers is not None:
        picked = {n for n in picked if _block_of(n) is not None and layers[0] <= _block_of(n) < layers[1]}
    return picked


def _peft_picks(targets: list[str], layers: list[int] | None, top: int) -> set[str]:
    """What PEFT adapts (peft.tuners.tuners_utils.check_target_module_exists) in a model of ``top`` blocks: an
    exact path regardless of layers_to_transform, a suffix match only in those blocks."""
    picked = set()
    for name in _universe(top):
        if name in targets:
            picked.add(name)
        elif any(name.endswith("." + t) for t in targets):
            if layers is None or (_block_of(name) is not None and _block_of(name) in layers):
                picked.add(name)
    return picked


def _top(names: Iterable[str], layers: tuple[int, int] | None = None) -> int:
    """The fewest blocks a model holding ``names`` (and the block range ``layers``) has."""
    blocks = [b for b in map(_block_of, names) if b is not None]
    return max([b + 1 for b in blocks] + ([layers[1]] if layers else []) + [0])


def _settings(names: list[str], targets: Iterable[str] | None, layers: tuple[int, int] | None) -> dict[str, Any]:
    """LoraConfig's targets and layers for an adapter of the linears ``names``: the file's own ``targets`` and
    ``layers`` when they pick exactly those (each target picking one at least), else the names themselves."""
    if targets is not None:
        targets = tuple(targets)
        if (targets and all(isinstance(t, str) and t for t in targets)
                and all(any(_ends_with(n, t) for n in names) for t in targets)
                and _gemmalab_picks(targets, layers, _top(names, layers)) == set(names)):
            return {"targets": targets, "layers": layers}
    return {"targets": tuple(names), "layers": None}


def _lora_config(where: Path, **values: Any) -> LoraConfig:
    try:
        return LoraConfig(**values)
    except ConfigError as err:
        raise InputError(f"{where}: {err}") from None


# --------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not valid JSON ({err}): fix or replace it") from None
    except OSError as err:
        raise InputError(f"{path} cannot be read ({err.strerror}): check the path and its permissions") from None
    if not isinstance(values, dict):
        raise InputError(f"{path} must hold a JSON object, not {type(values).__name__}")
    return values


def _read_tensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32, through gemmalab's reader (float32, bfloat16, float16)."""
    keys = [k for k in checkpoint._open(file).keys()]  # noqa: SIM118  (a safetensors handle, not a dict)
    stored = checkpoint.Weights({key: (file, key) for key in keys})
    out = {}
    for key in keys:
        array = stored[key]
        if not np.issubdtype(np.asarray(array).dtype, np.floating) and stored.stored_dtype(key) is None:
            raise InputError(f"{file.name}: tensor {key} is {np.asarray(array).dtype}, not floating point: "
                             "an adapter's tensors are float32, bfloat16 or float16")
        out[key] = np.asarray(array, np.float32)
    return out


def _linear_name(module: str) -> str | None:
    """The canonical path of a module path from a file (multimodal layouts mapped as checkpoints map them),
    "" for the vision tower and projector, None for anything else."""
    name = checkpoint._canonical(module + ".weight")
    return name if not name else name.removesuffix(".weight")


def _group(file: Path, tensors: Mapping[str, np.ndarray], split: Callable[[str], tuple[str, str] | None],
           fmt: str) -> dict[str, dict[str, np.ndarray]]:
    """Tensors by canonical linear and part (lora_A, lora_B, magnitude); ``split`` cuts a key into (module
    path, part) or gives None for a key that is no adapter tensor of the format."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        cut = split(key)
        if cut is None:
            raise InputError(f"{file}: {key} is no {LABELS[fmt]} LoRA/DoRA tensor ({_expected_keys(fmt)}): "
                             "the adapter holds more than gemmalab reads (bias, embedding or full-weight tensors?)")
        module, part = cut
        name = _linear_name(module)
        if name == "":
            raise InputError(f"{file}: {key} adapts the vision tower, which gemmalab's text model does not have: "
                             "use an adapter of the language model only")
        if name is None or not _is_linear(name):
            raise InputError(f"{file}: {key} adapts {module}, which is no linear gemmalab adapts (a block's "
                             "q/k/v/o_proj, gate/up/down_proj, or lm_head): use an adapter of those only")
        if part in grouped.setdefault(name, {}):
            raise InputError(f"{file}: the {part} of {name} appears twice ({key}): remove one")
        grouped[name][part] = array
    if not grouped:
        raise InputError(f"{file} holds no tensor: the adapter is empty; save it again")
    return _ordered(grouped)


def _expected_keys(fmt: str) -> str:
    if fmt == PEFT:
        return f"{PEFT_PREFIX}<linear>.lora_A.weight, .lora_B.weight, .lora_magnitude_vector"
    return "<linear>.lora_a, .lora_b, .m"


def _check_parts(file: Path, grouped: Mapping[str, Mapping[str, np.ndarray]], rank: int, dora: bool,
                 fmt: str) -> None:
    """Each linear holds A and B (and DoRA's magnitude exactly when DoRA), of the rank, in consistent shapes."""
    names = {LORA_A: "lora_a" if fmt == MLX else "lora_A", LORA_B: "lora_b" if fmt == MLX else "lora_B",
             MAGNITUDE: "m" if fmt == MLX else "lora_magnitude_vector"}
    for name, parts in grouped.items():
        for part in (LORA_A, LORA_B):
            if part not in parts:
                other = LORA_B if part == LORA_A else LORA_A
                raise InputError(f"{file}: {name} has {names[other]} but no {names[part]}: the file is incomplete; "
                                 "save the adapter again")
        if MAGNITUDE in parts and not dora:
            flag = '"use_dora": true' if fmt == PEFT else '"fine_tune_type": "dora"'
            raise InputError(f"{file}: {name} has a DoRA magnitude ({names[MAGNITUDE]}) but {CONFIG_FILE} does not "
                             f"say DoRA ({flag}): fix the config")
        if dora and MAGNITUDE not in parts:
            raise InputError(f"{file}: {name} lacks DoRA's magnitude ({names[MAGNITUDE]}), which a DoRA adapter "
                             "holds for every linear: the file is incomplete; save the adapter again")
        a, b = parts[LORA_A], parts[LORA_B]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            if fmt == PEFT:
                shapes = f"lora_A {a.shape} and lora_B {b.shape} (as [rank, in] and [out, rank])"
                hint = " (per-linear ranks, PEFT's rank_pattern, are not supported)"
            else:
                shapes, hint = f"lora_a {a.T.shape} and lora_b {b.T.shape} (as [in, rank] and [rank, out])", ""
            raise InputError(f"{file}: {name} has {shapes}, which is not rank {rank} as {CONFIG_FILE} says{hint}")
        if MAGNITUDE in parts and parts[MAGNITUDE].shape != (b.shape[0],):
            raise InputError(f"{file}: {name}'s DoRA magnitude is {parts[MAGNITUDE].shape}, but its B gives "
                             f"{b.shape[0]} outputs: the file is corrupt; save the adapter again")


def _number(where: Path, key: str, value: Any, *, integer: bool = False) -> Any:
    ok = is_count(value) if integer else (isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok:
        raise InputError(f"{where}: {key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    return value


def _off(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (list, dict, str, tuple)) and not value)


def _check_peft_config(path: Path, config: Mapping[str, Any]) -> None:
    """Refuse, in one line each, the PEFT options an adapter of gemmalab's cannot be."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InputError(f"{path}: peft_type is {peft_type!r}: gemmalab reads LoRA and DoRA adapters "
                         '("peft_type": "LORA") only')
    if config.get("bias", "none") != "none":
        raise InputError(f"{path}: bias is {config['bias']!r}: the adapter trained biases too, which gemmalab's "
                         'adapters do not hold; train with bias="none"')
    if config.get("fan_in_fan_out"):
        raise InputError(f"{path}: fan_in_fan_out is true, the layout of GPT-2-style Conv1D weights, not of "
                         "Gemma's linears: this adapter was made for another model")
    if not _off(config.get("modules_to_save")):
        raise InputError(f"{path}: modules_to_save is {config['modules_to_save']!r}: the adapter carries whole "
                         "modules besides LoRA, which gemmalab does not read; save a LoRA-only adapter")
    init = config.get("init_lora_weights", True)
    if init not in _PEFT_INITS:
        raise InputError(f"{path}: init_lora_weights is {init!r}, which changes the base weights as well: "
                         "convert the adapter to plain LoRA first (PEFT's save_pretrained with "
                         "path_initial_model_for_weight_conversion)")
    if not _off(config.get("loftq_config")):
        raise InputError(f"{path}: loftq_config is set: the adapter belongs to a LoftQ-quantized base; "
                         "gemmalab merges into the original weights only")
    for key, single in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise InputError(f"{path}: {key} must be a mapping, got {pattern!r}")
        odd = {k: v for k, v in pattern.items() if v != config.get(single)}
        if odd:
            name, value = next(iter(odd.items()))
            raise InputError(f"{path}: {key} gives {name!r} {single} {value!r}, not {config.get(single)!r}: "
                             f"gemmalab adapters have one rank and one alpha for every linear")
    pattern = config.get("layers_pattern")
    if not _off(pattern) and pattern not in ("layers", ["layers"]):
        raise InputError(f"{path}: layers_pattern is {pattern!r}: Gemma's blocks are model.layers; "
                         "write \"layers\" or leave it out")
    for key, value in config.items():
        if key not in _PEFT_IGNORED and not _off(value):
            raise InputError(f"{path}: {key} is {value!r}, a PEFT option gemmalab does not read (it may change what "
                             "the adapter computes): use a plain LoRA or DoRA adapter")


def _folder(path: str | os.PathLike, fmt: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder: give {LABELS[fmt]}'s adapter folder "
                         f"({' + '.join(FILES[fmt])})")
    for name in FILES[fmt]:
        if not (folder / name).is_file():
            if fmt == PEFT and name == PEFT_WEIGHTS and (folder / PEFT_PICKLE).is_file():
                raise InputError(f"{folder} holds {PEFT_PICKLE}, a pickle, which gemmalab does not read since "
                                 "unpickling can run code: save the adapter again with safe_serialization=True")
            raise InputError(f"{folder} has no {name}: a {LABELS[fmt]} adapter folder holds "
                             f"{' and '.join(FILES[fmt])}")
    return folder


def read_peft(folder: str | os.PathLike) -> Adapter:
    """The LoRA/DoRA adapter in a PEFT adapter folder (``save_pretrained``'s), strictly: an option or a tensor
    gemmalab cannot honour is one InputError line naming it and the fix. Tensors come as float32."""
    folder = _folder(folder, PEFT)
    config_path, file = folder / CONFIG_FILE, folder / PEFT_WEIGHTS
    config = _read_json(config_path)
    _check_peft_config(config_path, config)
    rank = _number(config_path, "r", config.get("r", 8), integer=True)
    alpha = _number(config_path, "lora_alpha", config.get("lora_alpha", 8))
    dropout = _number(config_path, "lora_dropout", config.get("lora_dropout", 0.0))
    dora, rslora = bool(config.get("use_dora", False)), bool(config.get("use_rslora", False))

    def split(key: str) -> tuple[str, str] | None:
        if not key.startswith(PEFT_PREFIX):
            return None
        for suffix, part in PEFT_PARTS.items():
            if key.endswith("." + suffix):
                return key[len(PEFT_PREFIX):-len(suffix) - 1], part
        return None

    grouped = _group(file, _read_tensors(file), split, PEFT)
    _check_parts(file, grouped, rank, dora, PEFT)
    names = list(grouped)
    targets, layers = config.get("target_modules"), config.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    blocks = [b for b in map(_block_of, names) if b is not None]
    if isinstance(targets, list) and (layers is None or (isinstance(layers, list) and blocks)):
        span = None if layers is None else (min(blocks), max(blocks) + 1)
        settings = _settings(names, targets, span)
    else:  # a regular expression, "all-linear": the linears themselves
        settings = _settings(names, None, None)
    return Adapter(_lora_config(config_path, rank=rank, alpha=alpha, rslora=rslora, dropout=dropout, dora=dora,
                                **settings), grouped)


def read_mlx(folder: str | os.PathLike) -> Adapter:
    """The LoRA/DoRA adapter in an mlx-lm adapter folder (``mlx_lm.lora``'s), strictly. ``scale`` becomes
    alpha = scale * rank with rsLoRA off (the same factor). Tensors come as float32, in PEFT's orientation."""
    folder = _folder(folder, MLX)
    config_path, file = folder / CONFIG_FILE, folder / MLX_WEIGHTS
    config = _read_json(config_path)
    kind = config.get("fine_tune_type", "lora")
    if kind == "full":
        raise InputError(f"{config_path}: fine_tune_type is \"full\": the folder holds fine-tuned weights, not an "
                         "adapter; fuse them into a checkpoint with mlx_lm.fuse")
    if kind not in _MLX_FINE_TUNE_TYPES:
        raise InputError(f"{config_path}: fine_tune_type is {kind!r}: gemmalab reads \"lora\" and \"dora\" adapters")
    num_layers = _number(config_path, "num_layers", config.get("num_layers"), integer=True)
    parameters = config.get("lora_parameters")
    if not isinstance(parameters, dict):
        raise InputError(f"{config_path}: lora_parameters must be a mapping with rank, scale and dropout, "
                         f"got {parameters!r}")
    unknown = sorted(set(parameters) - _MLX_LORA_PARAMETERS)
    if unknown:
        raise InputError(f"{config_path}: lora_parameters has {unknown[0]!r}, which mlx-lm does not read "
                         f"(it reads {', '.join(sorted(_MLX_LORA_PARAMETERS))}; its scale is alpha / rank)")
    for key in ("rank", "scale", "dropout"):
        if key not in parameters:
            raise InputError(f"{config_path}: lora_parameters lacks {key!r}, which mlx-lm needs to load the adapter")
    rank = _number(config_path, "lora_parameters.rank", parameters["rank"], integer=True)
    scale = _number(config_path, "lora_parameters.scale", parameters["scale"])
    dropout = _number(config_path, "lora_parameters.dropout", parameters["dropout"])
    keys = parameters.get("keys")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise InputError(f"{config_path}: lora_parameters.keys must be a list of module paths, got {keys!r}")
    dora = kind == "dora"

    def split(key: str) -> tuple[str, str] | None:
        module, _, leaf = key.rpartition(".")
        return (module, MLX_PARTS[leaf]) if module and leaf in MLX_PARTS else None

    grouped = _group(file, _read_tensors(file), split, MLX)
    tensors = {name: {part: np.ascontiguousarray(array.T) if part != MAGNITUDE else array  # PEFT's orientation
                      for part, array in parts.items()} for name, parts in grouped.items()}
    _check_parts(file, tensors, rank, dora, MLX)
    names = list(tensors)
    blocks = [b for b in map(_block_of, names) if b is not None]
    span = None
    if blocks:
        low, high = min(blocks), max(blocks) + 1
        # every block from 0 when the wrapped range (the last num_layers) starts at 0 and ends at the top
        span = None if low == 0 and (num_layers <= 0 or num_layers == high) else (low, high)
    settings = _settings(names, BLOCK_LINEARS if keys is None else keys, span)
    if scale <= 0:
        raise InputError(f"{config_path}: lora_parameters.scale is {scale!r}: gemmalab's adapters have a positive "
                         "scale (alpha / rank)")
    return Adapter(_lora_config(config_path, rank=rank, alpha=float(scale) * rank, rslora=False, dropout=dropout,
                                dora=dora, **settings), tensors)


def detect_format(path: str | os.PathLike) -> str | None:
    """``"peft"`` or ``"mlx"`` for an adapter folder of that format (or a file in one), None otherwise."""
    folder = Path(path).expanduser()
    if folder.is_file() and folder.name in (CONFIG_FILE, PEFT_WEIGHTS, PEFT_PICKLE, MLX_WEIGHTS):
        folder = folder.parent
    if not folder.is_dir():
        return None
    config_path = folder / CONFIG_FILE
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = None
        if isinstance(config, dict) and "peft_type" in config:
            return PEFT
        if isinstance(config, dict) and ("lora_parameters" in config or "fine_tune_type" in config):
            return MLX
    if (folder / PEFT_WEIGHTS).is_file() or (folder / PEFT_PICKLE).is_file():
        return PEFT
    if (folder / MLX_WEIGHTS).is_file():
        return MLX
    return None


def read_adapter(path: str | os.PathLike) -> Adapter:
    """The adapter in a PEFT or an mlx-lm adapter folder (or a file in one), whichever it is."""
    source = Path(path).expanduser()
    if not source.exists():
        raise InputError(f"{source} does not exist: give {WHAT_IS_AN_ADAPTER}")
    fmt = detect_format(source)
    if fmt is None:
        raise InputError(f"{source} is not an adapter: give {WHAT_IS_AN_ADAPTER}")
    folder = source.parent if source.is_file() else source
    return read_peft(folder) if fmt == PEFT else read_mlx(folder)


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------
def _check_adapter(adapter: Adapter, model: Gemma3Config | None) -> list[str]:
    """The adapter's linears in checkpoint order, after checking it is one these formats can hold: canonical
    linear names, A and B (and the magnitude for DoRA) of its rank; against ``model`` when given."""
    if not isinstance(adapter, Adapter):
        raise InputError(f"write an Adapter (gemmalab.lora.Adapter), not {type(adapter).__name__}")
    if model is not None:
        adapter.check(model)
    if not adapter.tensors:
        raise InputError("the adapter adapts no linear: there is nothing to write")
    for name in adapter.tensors:
        if not _is_linear(name):
            raise InputError(f"the adapter adapts {name!r}, which is no linear of a Gemma 3 text model "
                             "(model.layers.N.self_attn.q_proj ..., lm_head)")
    arrays = {n: {p: np.asarray(v) for p, v in parts.items()} for n, parts in adapter.tensors.items()}
    _check_parts(Path("the adapter"), arrays, adapter.config.rank, adapter.config.dora, PEFT)
    return sorted(adapter.tensors, key=_order)


def _float32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array, np.float32))


def _peft_targets(adapter: Adapter, names: list[str]) -> tuple[list[str], list[int] | None]:
    """target_modules and layers_to_transform that make PEFT adapt exactly ``names``: the LoraConfig's own
    targets and layer range where PEFT's rule picks the same linears with them, else the exact paths."""
    config = adapter.config
    targets = list(config.targets)
    layers = list(range(*config.layers)) if config.layers is not None else None
    if _peft_picks(targets, layers, _top(names, config.layers)) == set(names):
        return targets, layers
    return list(names), None


def write_peft(adapter: Adapter, folder: str | os.PathLike, *, base_model_name_or_path: str | None = None,
               model: Gemma3Config | None = None, overwrite: bool = False,
               overwrite_hint: str = "pass overwrite=True") -> Path:
    """``adapter`` as a PEFT adapter folder that ``PeftModel.from_pretrained(Gemma3ForCausalLM, folder)`` loads:
    adapter_config.json and adapter_model.safetensors (float32). ``model``: the base's config, to check the
    shapes against first. ``base_model_name_or_path`` is recorded for PEFT (where it finds the base by itself)."""
    names = _check_adapter(adapter, model)
    config = adapter.config
    targets, layers = _peft_targets(adapter, names)
    settings = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "revision": None,
        "inference_mode": True,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "use_dora": config.dora,
        "target_modules": targets,
        "layers_to_transform": layers,
        "layers_pattern": None,
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layer_replication": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "auto_mapping": None,
    }
    tensors = {}
    for name in names:
        parts = adapter.tensors[name]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = _float32(parts[LORA_A])
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = _float32(parts[LORA_B])
        if config.dora:
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = _float32(parts[MAGNITUDE])
    return _write_folder(folder, PEFT, {PEFT_WEIGHTS: tensors, CONFIG_FILE: settings}, overwrite, overwrite_hint)


def write_mlx(adapter: Adapter, folder: str | os.PathLike, *, model: Gemma3Config | None = None,
              overwrite: bool = False, overwrite_hint: str = "pass overwrite=True") -> Path:
    """``adapter`` as an mlx-lm adapter folder that ``mlx_lm.load(base, adapter_path=folder)`` loads:
    adapter_config.json and adapters.safetensors (float32). ``model``: the base's config, which says where
    the top block is (needed when the adapter does not adapt every block) and checks the shapes."""
    names = _check_adapter(adapter, model)
    config = adapter.config
    blocks = sorted({b for b in map(_block_of, names) if b is not None})
    if model is not None:
        top = model.num_hidden_layers
    elif not blocks or (config.layers is None and not any(t.startswith("model.layers.") for t in config.targets)):
        top = blocks[-1] + 1 if blocks else 0  # it adapts every block: the last one is the top
    else:
        span = f"blocks {blocks[0]}:{blocks[-1] + 1}" if blocks else "no block"
        raise InputError(f"mlx-lm counts an adapter's blocks from the top (num_layers), and this adapter adapts "
                         f"{span} of a model whose block count it does not say: give the base model "
                         "(--base in the CLI, model= in Python)")
    paths = {name.split(".", 3)[3] if _block_of(name) is not None else name for name in names}
    keys = [p for p in (*BLOCK_LINEARS, HEAD) if p in paths]
    settings = {
        "fine_tune_type": "dora" if config.dora else "lora",
        "num_layers": top - blocks[0] if blocks else 0,
        "lora_parameters": {"rank": config.rank, "scale": config.scale, "dropout": config.dropout, "keys": keys},
    }
    tensors = {}
    for name in names:
        parts = adapter.tensors[name]
        tensors[f"{name}.lora_a"] = _float32(np.asarray(parts[LORA_A]).T)
        tensors[f"{name}.lora_b"] = _float32(np.asarray(parts[LORA_B]).T)
        if config.dora:
            tensors[f"{name}.m"] = _float32(parts[MAGNITUDE])
    return _write_folder(folder, MLX, {MLX_WEIGHTS: tensors, CONFIG_FILE: settings}, overwrite, overwrite_hint)


def write_adapter(adapter: Adapter, folder: str | os.PathLike, format: str, **options: Any) -> Path:  # noqa: A002
    """``adapter`` written in ``format`` ("peft" or "mlx"); ``options`` go to write_peft / write_mlx."""
    fmt = check_format(format)
    return write_peft(adapter, folder, **options) if fmt == PEFT else write_mlx(adapter, folder, **options)


def check_format(format: str) -> str:  # noqa: A002
    """``format`` as one of FORMATS ("mlx-lm" is "mlx"), or one InputError line."""
    fmt = str(format).strip().lower()
    fmt = {"mlx-lm": MLX, "mlx_lm": MLX}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise InputError(f"unknown adapter format {format!r}: choose peft or mlx")
    return fmt


def _write_folder(folder: str | os.PathLike, fmt: str, files: Mapping[str, Any], overwrite: bool,
                  overwrite_hint: str) -> Path:
    """Write ``files`` (a dict of tensors -> safetensors, anything else -> JSON) as the adapter folder
    ``folder``: a new or empty folder through a temporary folder beside it, renamed into place; an adapter of
    the same format (with ``overwrite``) file by file, each atomically, the tensors first."""
    out = check_writable_folder(folder, what="adapter folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present:
        if detect_format(out) != fmt:
            raise InputError(f"{out} is not empty and holds no {LABELS[fmt]} adapter ({present[0]} ...): "
                             "choose an empty or a new folder")
        if not overwrite:
            raise InputError(f"{out} already holds a {LABELS[fmt]} adapter: choose an empty folder or {overwrite_hint}")

    def write_into(place: Path) -> None:
        for name in sorted(files, key=lambda n: n == CONFIG_FILE):  # the config last: it says the folder is done
            content = files[name]
            if name.endswith(".safetensors"):
                checkpoint.atomic_save_safetensors(place / name, content)
            else:
                checkpoint.atomic_write_json(place / name, content)

    with writing(out, "adapter folder"):
        if present:
            write_into(out)
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
        temporary.mkdir()
        try:
            write_into(temporary)
            os.replace(temporary, out)  # onto a missing or an empty folder
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    return out


# --------------------------------------------------------------------------------------------------------
# Merging into a checkpoint
# --------------------------------------------------------------------------------------------------------
class _Merged(Mapping):
    """The base weights with each adapted linear merged (gemmalab.lora's rules, in float32) and cast back to
    the base tensor's dtype, one tensor at a time as the writer asks for it."""

    def __init__(self, weights: Mapping[str, np.ndarray], adapter: Adapter):
        self.weights, self.adapter = weights, adapter

    def __getitem__(self, name: str) -> np.ndarray:
        base = self.weights[name]
        linear = name.removesuffix(".weight")
        if linear == name or linear not in self.adapter.tensors:
            return base
        one = with_tensors(self.adapter, {linear: self.adapter.tensors[linear]})
        return one.merged({name: base})[name].astype(np.asarray(base).dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    def __contains__(self, name: object) -> bool:
        return name in self.weights


def merge_checkpoint(base: str | os.PathLike, adapter: Adapter | str | os.PathLike, out: str | os.PathLike, *,
                     overwrite: bool = False, overwrite_hint: str = "pass overwrite=True") -> Path:
    """An ordinary checkpoint at ``out``: the base checkpoint (a folder in Hugging Face's layout, or a cached
    repo id) with ``adapter`` (an Adapter, or an adapter folder) merged into its weights, each in the base's
    dtype, the same config, and the base's tokenizer and generation files. Written by gemmalab's checkpoint
    writer (every file atomically); the adapter is checked against the base's config first."""
    target = check_writable_folder(out, what="output folder")
    folder = checkpoint.locate(base)
    if target.exists() and target.resolve() == folder.resolve():
        raise InputError(f"{target} is the base checkpoint itself: write the merged one to another folder")
    config = checkpoint.load_config(folder)
    weights = checkpoint.read_weights(folder, config)
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    try:
        adapter.check(config)
    except GemmalabError as err:
        raise InputError(f"the adapter does not fit {folder}: {err}") from None
    return checkpoint.save_checkpoint(target, config, _Merged(weights, adapter), copy_from=folder,
                                      overwrite=overwrite, overwrite_hint=overwrite_hint)


__all__ = [
    "BLOCK_LINEARS",
    "FORMATS",
    "MLX",
    "PEFT",
    "check_format",
    "detect_format",
    "merge_checkpoint",
    "read_adapter",
    "read_mlx",
    "read_peft",
    "write_adapter",
    "write_mlx",
    "write_peft",
]
