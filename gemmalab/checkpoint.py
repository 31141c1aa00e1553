"""Checkpoints: find them, read their weights strictly, save them back in the Hugging Face layout.

Where a model comes from (``locate``):
  a local folder (or a config.json inside one) > the Hugging Face cache > the Hub through huggingface-hub.
  ``HF_HUB_OFFLINE=1`` is honoured: a model that is not cached says how to get it.

What is read (``read_weights``): safetensors only -- single files and shards with
``model.safetensors.index.json``. Nothing from a checkpoint is executed or unpickled, so ``*.bin``
(pickle) checkpoints are refused with the way to convert them.

Three key layouts exist and map onto one canonical naming (HF ``Gemma3ForCausalLM``: ``model.*``):
  ``model.*``                 Gemma3ForCausalLM (text-only checkpoints: 270M, 1B)
  ``language_model.model.*``  Gemma3ForConditionalGeneration as first published (4.50) and as transformers 5 saves it
  ``model.language_model.*``  Gemma3ForConditionalGeneration as transformers 4.52-4.57 saved it
Vision-tower and projector tensors are recognised and left aside for text-only use.

Loading is strict: a missing, unexpected or misshapen tensor is an error that names it.

Quantized checkpoints are mlx-lm's format (``mlx_lm.convert -q``; ``gemmalab convert --quantize`` writes the
same): config.json's ``"quantization": {"group_size": 64, "bits": 4, "mode": "affine"}`` (copied to
``"quantization_config"``; per-module overrides as ``"<module>": {...}`` entries inside it), and per quantized
module ``<module>.weight`` (packed uint32 [out, in * bits / 32]), ``<module>.scales`` and ``<module>.biases``
([out, in / group_size], the model's dtype): gemmalab.quantize's numbers. mlx-lm quantizes every linear and
the embedding (a QuantizedEmbedding that is also the tied head). ``read_weights(..., quantized=True)``
checks them as strictly as dense tensors; see ``Weights.quantized``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .config import Gemma3Config
from .dtypes import numpy_dtype
from .errors import CheckpointError, ConfigError, InputError, ModelNotFoundError
from .linears import linears as linear_specs
from .outputs import check_writable_folder, writing
from .params import EMBED, LM_HEAD, parameter_shapes
from .quantize import check_options, check_shape, dequantize, quantize, quantized_shapes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files that travel with the weights: tokenizer, chat template, generation defaults.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
# What the Hub download fetches: weights, configs, tokenizer. Never *.bin, *.pt, *.gguf.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.md"]
DEFAULT_SHARD_BYTES = 5 * 1024**3
# Weights gemmalab refuses to read: unpickling can run code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# key prefix in the file -> canonical prefix
LAYOUTS = {
    "model.": "model.",
    "language_model.model.": "model.",
    "model.language_model.": "model.",
}
HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")
VISION_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


# ---------------------------------------------------------------------------------------------------------
# Finding a checkpoint
# ---------------------------------------------------------------------------------------------------------
def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def locate(source: str | os.PathLike, *, revision: str | None = None, download: bool = True) -> Path:
    """The local folder holding ``source``: a folder, a config.json, a cached repo id, or a downloaded one."""
    path = Path(source).expanduser()
    if path.is_file() and path.name == "config.json":
        return path.parent
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or not _looks_like_repo_id(text) or text.startswith("/"):
        raise ModelNotFoundError(f"{text} is not a folder with a config.json: pass a checkpoint folder or a Hub repo id")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=DOWNLOAD_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, RepositoryNotFoundError, ValueError):
        pass  # not cached: try the Hub below
    if not download or _offline():
        raise _not_cached(text, "offline mode is on (HF_HUB_OFFLINE=1)" if _offline() else "downloads are off here")
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as err:  # network failures come in many types across huggingface-hub versions
        raise _hub_error(err, text, revision, doing=f"could not download {text}") from None


def _not_cached(repo_id: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {repo_id!r} is not in the Hugging Face cache and {why}: run `gemmalab download {repo_id}` "
        f"where the network reaches the Hub, or pass a local checkpoint folder"
    )


def _root(err: BaseException) -> BaseException:
    """The error at the bottom of ``err``'s chain: huggingface-hub wraps a network failure (httpx's
    ConnectError, ReadTimeout, ...) in errors of its own."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _one_line(err: BaseException) -> str:
    """``Type: first line``: huggingface-hub's messages span several lines, the CLI's failure policy is one."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _hub_error(err: Exception, repo_id: str, revision: str | None, *, doing: str) -> ModelNotFoundError:
    """One line for what went wrong asking the Hub about ``repo_id`` (``doing`` says what was asked)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, GatedRepoError):
        return ModelNotFoundError(
            f"{repo_id} is gated: accept its license on huggingface.co, then log in with `hf auth login`"
        )
    if isinstance(err, RepositoryNotFoundError):
        return ModelNotFoundError(
            f"{repo_id} is not a folder here and not a repository on the Hub (or it is private): check the name"
        )
    if isinstance(err, RevisionNotFoundError):
        return ModelNotFoundError(f"{repo_id} has no revision {revision!r}: check the branch, tag or commit")
    root = _root(err)
    if isinstance(root, HfHubHTTPError) and not isinstance(root, LocalEntryNotFoundError):  # an error page
        return ModelNotFoundError(f"{doing} ({_one_line(root)}): check the network, or pass a local folder")
    return ModelNotFoundError(
        f"{doing}: the Hugging Face Hub cannot be reached ({_one_line(root)}); check the network, "
        f"or pass a local folder"
    )


def locate_config(repo_id: str, *, revision: str | None = None) -> Path:
    """The local folder holding ``repo_id``'s config.json, for describing a model without its weights: the
    Hugging Face cache first, else config.json alone from the Hub (never the weights). The folder holds the
    weights too only when they were downloaded before.

    Offline (``HF_HUB_OFFLINE=1``) or with no network this fails at once, in one line, where
    ``hf_hub_download`` would retry a failed connection five times with backoff first (about 25 s)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=True)).parent
    except LocalEntryNotFoundError:
        pass  # not cached: ask the Hub below
    except ValueError:  # huggingface-hub's HFValidationError: characters a repo id cannot have
        raise ModelNotFoundError(f"{repo_id} is not a folder here and not a valid Hub repo id: check the spelling") from None
    if _offline():
        raise _not_cached(repo_id, "offline mode is on (HF_HUB_OFFLINE=1)")
    doing = f"could not fetch config.json of {repo_id}"
    try:
        # One HEAD with huggingface-hub's ETag timeout and no retries, so a dead network fails fast; only
        # then the download, which on a connection error retries with backoff and 60 s timeouts.
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json", revision=revision), timeout=constants.HF_HUB_ETAG_TIMEOUT)
        return Path(hf_hub_download(repo_id, "config.json", revision=revision)).parent
    except LocalEntryNotFoundError as err:  # an EntryNotFoundError too, but it means the Hub was not reached
        raise _hub_error(err, repo_id, revision, doing=doing) from None
    except EntryNotFoundError:
        raise ModelNotFoundError(f"{repo_id} has no config.json on the Hub: it is not a transformers checkpoint") from None
    except Exception as err:  # network failures come in many types across huggingface-hub versions
        raise _hub_error(err, repo_id, revision, doing=doing) from None


def load_config(folder: Path) -> Gemma3Config:
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} has no config.json: a Gemma 3 checkpoint folder needs one")
    return Gemma3Config.from_file(folder / "config.json")


def generation_eos_ids(folder: Path) -> tuple[int, ...] | None:
    """The eos ids of generation_config.json (instruction-tuned Gemma: 1 and 106), None when absent."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return None
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ConfigError(f"{path} is not valid JSON: fix or delete it") from None
    if eos is None:
        return None
    return tuple(int(t) for t in (eos if isinstance(eos, list) else [eos]))


# ---------------------------------------------------------------------------------------------------------
# Reading weights
# ---------------------------------------------------------------------------------------------------------
def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from the shard index when there is one."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{index} is not a valid shard index ({err}): re-download it") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in {folder}: {', '.join(missing)}; re-download them")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} has only pickle weights ({', '.join(pickles)}); gemmalab reads safetensors only, "
            f"since unpickling can run code: convert them to safetensors first"
        )
    raise CheckpointError(f"{folder} has no *.safetensors weights: download the full checkpoint")


def _canonical(key: str) -> str | None:
    """Canonical name of a file key, '' for tensors left aside (vision), None for unknown keys."""
    if key.startswith(VISION_PREFIXES):
        return ""
    if key in HEAD_KEYS:
        return LM_HEAD
    for prefix in ("language_model.model.", "model.language_model."):
        if key.startswith(prefix):
            return "model." + key[len(prefix):]
    if key.startswith("model."):
        return key
    return None


@dataclass(frozen=True)
class QuantizedTensors:
    """One quantized module of a checkpoint in mlx-lm's layout: ``<name>.weight`` packed uint32
    [out, in * bits / 32], ``<name>.scales`` and ``<name>.biases`` [out, in / group_size] in ``dtype``;
    the dense weight they stand for is [out, in] (``shape``), gemmalab.quantize.dequantize of them."""

    name: str  # canonical module name: "model.layers.0.self_attn.q_proj", "lm_head", "model.embed_tokens"
    bits: int
    group_size: int
    shape: tuple[int, int]  # the dense weight [out, in]
    dtype: np.dtype  # of the scales and biases
    locations: dict[str, tuple[Path, str]]  # "weight", "scales", "biases" -> (file, key in file)


@dataclass
class Weights(Mapping):
    """Canonical name -> numpy array, read from safetensors on access (one at a time, with plain reads).

    A backend iterating over it converts tensor by tensor, so a checkpoint never sits in memory twice.
    ``read_into`` reads a tensor into the backend's own memory instead, skipping the numpy copy.

    A quantized checkpoint (``read_weights(..., quantized=True)``) adds two kinds of tensors:

    * ``quantized``: the quantized linears (block linears, an untied head) by module name. Their weights are
      *not* in the mapping: a backend's build makes each its ``quantized`` wrapper from exactly the file's
      numbers, ``QuantizedLinear.from_arrays(*weights.quantized_arrays(name), bits=, group_size=)``, and never
      holds a dense copy of them.
    * ``dequantized``: a quantized embedding (mlx-lm's QuantizedEmbedding) by weight name. It *is* in the
      mapping, as the dense matrix it represents (dequantized on read, gemmalab.quantize.dequantize): the
      model's embedding and tied head are dense. (Keeping the tied head quantized is later work.)
    """

    locations: dict[str, tuple[Path, str]]  # canonical name -> (file, key in file)
    set_aside: list[str] = field(default_factory=list)  # vision/projector keys not used by the text model
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)
    _headers: dict[Path, tuple[int, dict]] = field(default_factory=dict, repr=False)
    quantized: dict[str, QuantizedTensors] = field(default_factory=dict)  # module name -> its numbers
    dequantized: dict[str, QuantizedTensors] = field(default_factory=dict)  # weight name -> its numbers

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = _open(file)
        return self._handles[file]

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.dequantized:
            entry = self.dequantized[name]
            return dequantize(*self._quantized_arrays(entry), entry.bits, entry.group_size)
        dtype = self.stored_dtype(name)
        if dtype is not None:  # plain reads: no memory map whose pages would count on top of the copy
            out = np.empty(self._entry(name)[1]["shape"], dtype)
            self.read_into(name, out)
            return out
        file, key = self.locations[name]  # other dtypes (a backend names the problem) through safetensors
        try:
            return self._handle(file).get_tensor(key)
        except SafetensorError as err:
            raise CheckpointError(f"{file}: tensor {key} cannot be read ({err}): the file may be corrupt; re-download it") from None

    def __contains__(self, name: object) -> bool:
        return name in self.locations or name in self.dequantized  # Mapping's default would read the tensor

    def subset(self, names: Iterable[str]) -> Weights:
        """The same lazy reader over ``names`` only (the weights of one stage of a partial model)."""
        names = list(names)
        plain = {name: self.locations[name] for name in names if name not in self.dequantized}
        return Weights(plain, [], self._handles, self._headers,
                       dequantized={name: self.dequantized[name] for name in names if name in self.dequantized})

    def stored_dtype(self, name: str) -> np.dtype | None:
        """The numpy dtype ``name`` is stored in (from the file's header), or None for a dtype other than
        float32, bfloat16 and float16. A dequantized tensor's is its scales' dtype (what reading it gives)."""
        if name in self.dequantized:
            return self.dequantized[name].dtype
        return _SAFETENSORS_DTYPES.get(self._entry(name)[1]["dtype"])

    def _entry(self, name: str) -> tuple[int, dict]:
        """(where the file's data begins, the header entry of ``name``: dtype, shape, data_offsets)."""
        return self._key_entry(*self.locations[name])

    def _key_entry(self, file: Path, key: str) -> tuple[int, dict]:
        if file not in self._headers:
            self._headers[file] = _read_header(file)
        start, header = self._headers[file]
        return start, header[key]

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Read ``name`` from its file straight into ``out`` (C-contiguous, writable, the stored dtype and
        shape) with plain reads, no memory map: a backend that allocates its own tensor and hands its
        memory here holds each tensor once while loading. (A memory-mapped read counts the file's pages in
        the process's resident memory too, on top of the copy, until the map closes.) A dequantized tensor
        is dequantized, then copied in (its dense matrix exists once more, transiently)."""
        if name in self.dequantized:
            entry = self.dequantized[name]
            if out.dtype != entry.dtype or tuple(out.shape) != entry.shape:
                raise ValueError(f"read_into({name!r}) needs a {entry.dtype} array of shape {entry.shape}, "
                                 f"got {out.dtype} {out.shape}")
            out[...] = self[name]
            return
        file, key = self.locations[name]
        if out.dtype != self.stored_dtype(name):
            raise ValueError(
                f"read_into({name!r}) needs a C-contiguous {self.stored_dtype(name)} array of shape "
                f"{tuple(self._entry(name)[1]['shape'])}, got {out.dtype} {out.shape}"
            )
        self._read_key(file, key, out)

    def _read_key(self, file: Path, key: str, out: np.ndarray) -> None:
        """The bytes of tensor ``key`` of ``file`` into ``out``, which must match its shape and size."""
        data_start, entry = self._key_entry(file, key)
        begin, end = entry["data_offsets"]
        if tuple(out.shape) != tuple(entry["shape"]) or not out.flags.c_contiguous or out.nbytes != end - begin:
            raise ValueError(
                f"read_into({key!r}) needs a C-contiguous array of shape {tuple(entry['shape'])} "
                f"({end - begin} bytes), got {out.dtype} {out.shape}"
            )
        target = memoryview(out.reshape(-1).view(np.uint8))
        with open(file, "rb") as handle:
            handle.seek(data_start + begin)
            filled = 0
            while filled < len(target):
                count = handle.readinto(target[filled:])
                if not count:
                    raise CheckpointError(
                        f"{file}: tensor {key} ends early: the file is truncated; re-download it"
                    )
                filled += count

    def quantized_arrays(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(packed uint32, scales, biases)`` of the quantized linear ``name`` (a key of ``quantized``), as
        numpy, read with plain reads: exactly the file's numbers, what gemmalab.quantize.quantize gives."""
        return self._quantized_arrays(self.quantized[name])

    def _quantized_arrays(self, entry: QuantizedTensors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shapes = quantized_shapes(*entry.shape, entry.bits, entry.group_size)
        out = []
        for part, dtype in (("weight", np.dtype(np.uint32)), ("scales", entry.dtype), ("biases", entry.dtype)):
            array = np.empty(shapes[part], dtype)
            self._read_key(*entry.locations[part], array)
            out.append(array)
        return out[0], out[1], out[2]

    def quantization(self) -> dict | None:
        """What is quantized, or None for a dense checkpoint: ``bits`` and ``group_size`` (an int, or the
        sorted list when modules differ), ``linears`` (how many are quantized linears) and ``embedding``
        (whether the embedding is quantized in the file, dequantized on read)."""
        entries = [*self.quantized.values(), *self.dequantized.values()]
        if not entries:
            return None

        def one_or_all(values: set[int]) -> int | list[int]:
            return next(iter(values)) if len(values) == 1 else sorted(values)

        return {
            "bits": one_or_all({e.bits for e in entries}),
            "group_size": one_or_all({e.group_size for e in entries}),
            "mode": "affine",
            "linears": len(self.quantized),
            "embedding": EMBED in self.dequantized,
        }

    def __iter__(self) -> Iterator[str]:
        return iter([*self.dequantized, *self.locations])  # the embedding first, in canonical order

    def __len__(self) -> int:
        return len(self.locations) + len(self.dequantized)


def quantized_linears(weights: Mapping | None) -> dict[str, QuantizedTensors]:
    """The quantized linears a backend's build makes as its ``quantized`` wrapper, by module name (a quantized
    checkpoint's ``Weights.quantized``; {} for any other mapping). Their weights are not in ``weights``."""
    return dict(weights.quantized) if isinstance(weights, Weights) else {}


def describe_quantization(summary: Mapping) -> str:
    """``Weights.quantization()`` in words: "4-bit, groups of 64 (mlx-lm's format): 42 linears and the embedding"."""
    def join(value):
        return value if isinstance(value, int) else "/".join(map(str, value))

    what = f"{summary['linears']} linears" + (" and the embedding" if summary["embedding"] else "")
    return f"{join(summary['bits'])}-bit, groups of {join(summary['group_size'])} (mlx-lm's format): {what}"


# safetensors' dtype names for the floating-point dtypes gemmalab computes in.
_SAFETENSORS_DTYPES = {
    "F32": numpy_dtype("float32"),
    "BF16": numpy_dtype("bfloat16"),
    "F16": numpy_dtype("float16"),
}


def _read_header(file: Path) -> tuple[int, dict]:
    """(where the tensor data begins, the JSON header: key -> {"dtype", "shape", "data_offsets"}) of a
    safetensors file: an 8-byte little-endian header length, the header, then the data, which the
    offsets count from (the format's definition)."""
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return 8 + size, json.loads(handle.read(size))


def _open(file: Path):
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({err}): it may be truncated or corrupt; re-download it"
        ) from None


def _header_shapes(handle, keys: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, safetensors dtype name: F32, BF16, U32, ...), from the header."""
    slices = {key: handle.get_slice(key) for key in keys}
    return {key: (tuple(part.get_shape()), part.get_dtype()) for key, part in slices.items()}


# ---------------------------------------------------------------------------------------------------------
# Quantized checkpoints: mlx-lm's format
# ---------------------------------------------------------------------------------------------------------
QUANTIZATION = "quantization"  # mlx-lm's config.json entry (mlx_lm.utils.quantize_model, save_config)
QUANTIZED_PARTS = ("scales", "biases")  # beside <module>.weight, the packed codes


@dataclass(frozen=True)
class Quantization:
    """config.json's ``quantization`` entry as mlx-lm writes and reads it: the ``bits`` and ``group_size``
    of every quantized module, and per-module overrides by canonical module name (``(bits, group_size)``,
    or None: left dense). Which modules are quantized is what the files hold (``<module>.scales``), as
    mlx-lm's loader decides it."""

    bits: int
    group_size: int
    modules: dict[str, tuple[int, int] | None] = field(default_factory=dict)

    def of(self, module: str) -> tuple[int, int] | None:
        return self.modules.get(module, (self.bits, self.group_size))

    def entry(self) -> dict[str, object]:
        """The config.json entry, as mlx-lm writes it (also written as ``quantization_config``)."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}


_READABLE = (
    "gemmalab reads mlx-lm's affine quantization with 4 or 8 bits in groups of 32, 64 or 128: dequantize it "
    "with `mlx_lm.convert --dequantize`, or use its dense checkpoint"
)


def _quantization_settings(value: object, where: str) -> tuple[int, int]:
    if not isinstance(value, Mapping) or "bits" not in value or "group_size" not in value:
        raise CheckpointError(f"{where} must give bits and group_size (mlx-lm's format), got {value!r}: fix config.json")
    mode = value.get("mode", "affine")  # mlx-lm before modes wrote none: affine
    if mode != "affine":
        raise CheckpointError(f"{where} has mode {mode!r}: {_READABLE}")
    try:
        return check_options(value["bits"], value["group_size"])
    except InputError as err:
        raise CheckpointError(f"{where}: {err}; {_READABLE}") from None


def read_quantization(folder: Path) -> Quantization | None:
    """The ``quantization`` entry of ``folder``/config.json (else an mlx-style ``quantization_config``), or
    None when there is none. Another method's ``quantization_config`` (``quant_method``: awq, gptq, bitnet,
    fp8, ...) and modes or sizes gemmalab does not compute with are one-line CheckpointErrors."""
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not valid JSON: fix or re-download it") from None
    entry = raw.get(QUANTIZATION) if isinstance(raw, dict) else None
    if entry is None and isinstance(raw, dict):
        entry = raw.get("quantization_config")
        if isinstance(entry, Mapping) and "quant_method" in entry:
            raise CheckpointError(
                f"{path} says the weights are quantized with {entry['quant_method']!r}, which gemmalab does not "
                f"read: {_READABLE}"
            )
    if entry is None:
        return None
    bits, group_size = _quantization_settings(entry, f"{path}: quantization")
    modules: dict[str, tuple[int, int] | None] = {}
    for key, value in entry.items():  # per-module entries: mlx-lm's module paths, mapped like tensor keys
        if not isinstance(value, Mapping | bool):
            continue  # bits, group_size, mode and other scalars
        module = _canonical(f"{key}.weight")
        if not module:
            continue  # the vision tower's, or a path gemmalab has no use for
        module = module.removesuffix(".weight")
        if value is True:
            modules[module] = (bits, group_size)
        elif value is False:
            modules[module] = None
        else:
            modules[module] = _quantization_settings(value, f"{path}: quantization of {key}")
    return Quantization(bits, group_size, modules)


def _shown(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def read_weights(folder: Path, config: Gemma3Config, *, quantized: bool = False) -> Weights:
    """Index every tensor of the checkpoint and validate names, shapes (and a quantized module's dtypes)
    against ``config``, strictly.

    Shapes come from the safetensors headers, so validation reads no tensor data. A quantized checkpoint
    (mlx-lm's format: the module docstring) is read only with ``quantized=True``, which gemmalab.load passes
    (its Weights then list the quantized linears apart, and give a quantized embedding dense: see
    ``Weights``); everything else that reads weights needs dense ones and gets a one-line error.
    """
    expected = parameter_shapes(config)
    locations: dict[str, tuple[Path, str]] = {}
    found: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, dtype)
    parts: dict[str, dict[str, tuple[Path, str, tuple[int, ...], str]]] = {}  # weight name -> scales/biases
    set_aside: list[str] = []
    unexpected: list[str] = []
    handles = {}
    for file in weight_files(folder):
        handle = handles[file] = _open(file)
        keys = list(handle.keys())
        for key, (shape, dtype) in _header_shapes(handle, keys).items():
            stem, _, part = key.rpartition(".")
            is_part = part in QUANTIZED_PARTS
            name = _canonical(f"{stem}.weight" if is_part else key)
            if name == "":
                set_aside.append(key)
            elif name == LM_HEAD and config.tie_word_embeddings:
                set_aside.append(key)  # a saved copy of the tied head: the embedding matrix serves
            elif name is None or name not in expected:
                unexpected.append(f"{key} (in {file.name})")
            elif is_part:
                if part in parts.setdefault(name, {}):
                    raise CheckpointError(f"tensor {key} appears twice ({parts[name][part][0].name} and {file.name}): remove one")
                parts[name][part] = (file, key, shape, dtype)
            else:
                if name in locations:
                    raise CheckpointError(f"tensor {key} appears twice ({locations[name][0].name} and {file.name}): remove one")
                locations[name] = (file, key)
                found[name] = (shape, dtype)

    if EMBED not in locations and not unexpected and not locations:
        raise CheckpointError(f"{folder} holds no Gemma 3 text weights (no {EMBED}): is this a Gemma 3 checkpoint?")
    if unexpected:
        raise CheckpointError(f"unexpected tensors for this config: {_shown(unexpected)}; the weights do not belong to this config.json")
    missing = [name for name in expected if name not in locations]
    if missing:
        raise CheckpointError(f"missing tensors in {folder}: {_shown(missing)}; the checkpoint is incomplete, re-download it")
    quantized_linears, dequantized = _quantized_modules(folder, config, parts, locations, found)
    if (quantized_linears or dequantized) and not quantized:
        summary = Weights({}, quantized=quantized_linears, dequantized=dequantized).quantization()
        raise CheckpointError(
            f"{folder} is quantized ({describe_quantization(summary)}) and this needs dense weights: gemmalab.load "
            f"reads it (and Model.save then writes a dense copy), or use the dense checkpoint it was made from"
        )
    for name, shape in expected.items():
        if name in locations and found[name][0] != shape:
            file, key = locations[name]
            raise CheckpointError(
                f"tensor {key} in {file.name} has shape {list(found[name][0])} but config.json implies "
                f"{list(shape)}: the weights and config.json disagree"
            )
    # Reorder to the canonical order so backends and saved files list tensors the same way.
    ordered = {name: locations[name] for name in expected if name in locations}
    return Weights(ordered, set_aside, handles, quantized=quantized_linears, dequantized=dequantized)


def _quantized_modules(
    folder: Path, config: Gemma3Config, parts: dict, locations: dict[str, tuple[Path, str]], found: dict
) -> tuple[dict[str, QuantizedTensors], dict[str, QuantizedTensors]]:
    """(quantized linears by module name, quantized embeddings by weight name) of a checkpoint whose
    ``<module>.scales`` / ``.biases`` are ``parts``; each checked against config.json's quantization entry,
    dtypes and shapes included. Their packed ``<module>.weight`` leaves ``locations`` and ``found``."""
    if not parts:
        return {}, {}
    quantization = read_quantization(folder)
    expected = parameter_shapes(config)
    wrappable = {spec.weight for spec in linear_specs(config).values() if not spec.tied}
    linears_out: dict[str, QuantizedTensors] = {}
    embeddings: dict[str, QuantizedTensors] = {}
    for name, held in parts.items():
        module = name.removesuffix(".weight")
        file, key, _, _ = next(iter(held.values()))
        if quantization is None:
            raise CheckpointError(
                f"{key} (in {file.name}) is a quantization tensor, but {folder / 'config.json'} has no "
                f'"quantization" entry (mlx-lm\'s {{"group_size": 64, "bits": 4}}): add the entry it was written '
                f"with, or use a dense checkpoint"
            )
        for part in QUANTIZED_PARTS:
            if part not in held:
                raise CheckpointError(
                    f"{key} (in {file.name}) has no {module}.{part} beside it: a quantized module needs "
                    f"{module}.weight, .scales and .biases; the checkpoint is incomplete, re-download it"
                )
        if name not in wrappable and name != EMBED:
            raise CheckpointError(
                f"{key} (in {file.name}) quantizes {name}, which is not a linear or the embedding: the weights "
                f"do not belong to this config.json"
            )
        setting = quantization.of(module)
        if setting is None:
            raise CheckpointError(
                f"{folder / 'config.json'} says {module} is not quantized, but {key} (in {file.name}) is its "
                f"quantization tensor: the weights and config.json disagree"
            )
        bits, group_size = setting
        out_features, in_features = expected[name]
        try:
            check_shape((out_features, in_features), bits, group_size)
        except InputError:
            raise CheckpointError(
                f"{name} [{out_features}, {in_features}] cannot be quantized in groups of {group_size}, as "
                f"config.json's quantization says: the weights and config.json disagree"
            ) from None
        shapes = quantized_shapes(out_features, in_features, bits, group_size)
        packed_file, packed_key = locations.pop(name)
        packed_shape, packed_dtype = found.pop(name)
        if (packed_shape, packed_dtype) != (shapes["weight"], "U32"):
            raise CheckpointError(
                f"tensor {packed_key} in {packed_file.name} is {packed_dtype} {list(packed_shape)}, but {bits}-bit "
                f"codes of a [{out_features}, {in_features}] weight pack into U32 {list(shapes['weight'])}: the "
                f"weights and config.json's quantization disagree"
            )
        dtypes = {held[part][3] for part in QUANTIZED_PARTS}
        for part in QUANTIZED_PARTS:
            part_file, part_key, part_shape, part_dtype = held[part]
            if part_shape != shapes[part] or part_dtype not in _SAFETENSORS_DTYPES or len(dtypes) != 1:
                raise CheckpointError(
                    f"tensor {part_key} in {part_file.name} is {part_dtype} {list(part_shape)}, but {bits}-bit "
                    f"groups of {group_size} of a [{out_features}, {in_features}] weight need {list(shapes[part])} "
                    f"scales and biases sharing one dtype of F32, BF16, F16: the weights and config.json disagree"
                )
        entry = QuantizedTensors(
            module, bits, group_size, (out_features, in_features), _SAFETENSORS_DTYPES[dtypes.pop()],
            {"weight": (packed_file, packed_key), **{part: held[part][:2] for part in QUANTIZED_PARTS}},
        )
        if name == EMBED:
            embeddings[name] = entry
        else:
            linears_out[module] = entry
    order = {weight: index for index, weight in enumerate(expected)}
    return dict(sorted(linears_out.items(), key=lambda item: order[item[0] + ".weight"])), embeddings


@dataclass(frozen=True)
class WeightsSummary:
    """What a checkpoint folder holds in weights, from the safetensors headers alone (no tensor data read)."""

    files: list[str]  # the safetensors files (the shards the index names, when there is one)
    bytes: int  # their total size on disk
    tensors: int  # tensors in their headers, vision and duplicate tensors included
    dtypes: list[str]  # stored dtypes: float32, bfloat16, float16, or safetensors' own name (I8, ...)
    ok: bool | None  # names and shapes match the config; None: there are no weights to check
    problem: str | None  # what is wrong and the fix, when not ok
    quantization: dict | None = None  # a quantized checkpoint's Weights.quantization(); None when dense


# safetensors' dtype names -> gemmalab's, for the floating-point dtypes it computes in.
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "U32": "uint32"}  # U32: packed codes


def summarize_weights(folder: str | os.PathLike, config: Gemma3Config) -> WeightsSummary:
    """The weights of ``folder`` checked against ``config`` as ``read_weights`` checks them, reading headers only.

    A folder with no weight files at all (config.json alone) is not a problem: ``ok`` is None. A folder whose
    weights cannot be used (truncated, unreadable, a shard missing, pickles, names or shapes that do not fit
    the config) gets ``ok`` False and the ``problem``, with what could still be counted.
    """
    folder = Path(folder)
    if not _has_weight_files(folder):
        return WeightsSummary(files=[], bytes=0, tensors=0, dtypes=[], ok=None, problem=None)
    try:
        files = weight_files(folder)
    except CheckpointError:  # a bad index or a missing shard (read_weights names it below): report what is there
        files = sorted(folder.glob("*.safetensors"))
    headers = {file: _header_entries(file) for file in files}
    problem = _truncation(headers)
    quantization = None
    if problem is None:
        try:
            quantization = read_weights(folder, config, quantized=True).quantization()
        except CheckpointError as err:
            problem = str(err)
    entries = [entry for found in headers.values() if found for entry in found[0]]
    return WeightsSummary(
        files=[file.name for file in files],
        bytes=sum(_size_on_disk(file) for file in files),
        tensors=len(entries),
        dtypes=sorted({_DTYPE_NAMES.get(entry.get("dtype"), str(entry.get("dtype"))) for entry in entries}),
        ok=problem is None,
        problem=problem,
        quantization=quantization,
    )


def _truncation(headers: dict[Path, tuple[list[dict], int] | None]) -> str | None:
    """The first file shorter than its header says, in words (safetensors itself only says "incomplete
    metadata, file not fully covered")."""
    for file, found in headers.items():
        if found is not None and _size_on_disk(file) < found[1]:
            return (f"{file} is truncated: {_size_on_disk(file):,} bytes where its header says {found[1]:,}; "
                    f"re-download it")
    return None


def _has_weight_files(folder: Path) -> bool:
    return (folder / INDEX_FILE).exists() or any(
        p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()
    )


def _size_on_disk(file: Path) -> int:
    try:
        return file.stat().st_size  # through the symlink: the Hugging Face cache links snapshots to blobs
    except OSError:
        return 0  # a dangling link: read_weights names it


def _header_entries(file: Path) -> tuple[list[dict], int] | None:
    """(the header entries of a safetensors file: dtype, shape, data_offsets; the file size they imply),
    or None when the header itself is unreadable (read_weights names that problem). A corrupt length is
    checked against the file's size before it is read, so garbage never asks for a huge buffer."""
    try:
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= os.fstat(handle.fileno()).st_size - 8:
                return None
            header = json.loads(handle.read(size))
        entries = [entry for key, entry in header.items() if key != "__metadata__"]
        data_end = max((int(entry["data_offsets"][1]) for entry in entries), default=0)
    except (OSError, ValueError, AttributeError, TypeError, KeyError, IndexError):  # not the format: no facts
        return None
    return entries, 8 + size + data_end


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def atomic_save_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # format=pt: transformers refuses safetensors files whose metadata lacks a known format.
        # (ascontiguousarray would turn a 0-d array, e.g. an optimizer's step count, into shape [1])
        arrays = {k: np.asarray(v) if np.ndim(v) == 0 else np.ascontiguousarray(v) for k, v in tensors.items()}
        save_file(arrays, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _shard(names_and_sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in names_and_sizes:
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _as(array: np.ndarray, itemsize: int | None, config: Gemma3Config) -> np.ndarray:
    """The array in the config's stored dtype (a no-op when it already is)."""
    array = np.asarray(array)
    return array if itemsize is None else array.astype(numpy_dtype(config.stored_dtype), copy=False)


def quantizable(config: Gemma3Config) -> list[str]:
    """The weights mlx-lm's ``quantize_model`` quantizes in a Gemma 3 text model, in checkpoint order: every
    linear (``to_quantized``: the block linears, an untied head) and the embedding (a QuantizedEmbedding,
    which is also the tied head)."""
    linear = {spec.weight for spec in linear_specs(config).values()}
    return [name for name in parameter_shapes(config) if name in linear or name == EMBED]


def check_quantizable(config: Gemma3Config, bits: object, group_size: object) -> Quantization:
    """The Quantization that saving ``config`` quantized with ``bits`` and ``group_size`` writes, once every
    weight it quantizes (``quantizable``) splits into whole groups; else an InputError naming the first
    that does not, and the group sizes that would fit every one."""
    bits, group_size = check_options(bits, group_size)
    shapes = parameter_shapes(config)
    names = quantizable(config)
    for name in names:
        if shapes[name][1] % group_size:
            fits = [g for g in (32, 64, 128) if all(shapes[n][1] % g == 0 for n in names)]
            hint = f"use group size {' or '.join(map(str, fits))}" if fits else "no group size (32, 64, 128) fits them all"
            raise InputError(
                f"cannot quantize in groups of {group_size}: {name} {list(shapes[name])} has {shapes[name][1]} "
                f"input features, not a multiple of {group_size}; {hint}"
            )
    return Quantization(bits, group_size)


def save_checkpoint(
    folder: str | os.PathLike,
    config: Gemma3Config,
    weights: Mapping[str, np.ndarray],
    *,
    copy_from: Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    overwrite_hint: str = "pass overwrite=True",
    quantize: tuple[int, int] | None = None,
) -> Path:
    """Write ``weights`` (canonical names) and ``config`` as a Gemma3ForCausalLM checkpoint that
    transformers and mlx-lm load. Tensors are cast to ``config.stored_dtype`` (kept as given when it is
    None). Every file is written atomically; tokenizer and generation files are copied from ``copy_from``
    when given. Refuses to write over existing weights unless ``overwrite`` (``overwrite_hint`` is how the
    caller's user asks for that: the CLI says ``--overwrite``). A folder that cannot be written is an
    OutputError before anything is written.

    ``quantize=(bits, group_size)`` writes mlx-lm's quantized format instead (the module docstring), as
    ``mlx_lm.convert -q`` does: every linear and the embedding (``quantizable``) cast to the stored dtype,
    then quantized with gemmalab.quantize (``mx.quantize``'s numbers) one tensor at a time, and config.json
    gets the ``quantization`` and ``quantization_config`` entries. Needs ``config.stored_dtype``; bad
    options or a weight that does not split into whole groups are InputErrors before anything is written.
    mlx_lm.load reads the result; transformers does not (no transformers quantizer reads mlx-lm's format)."""
    out = Path(folder).expanduser()
    expected = parameter_shapes(config)
    quantization = None
    if quantize is not None:
        quantization = check_quantizable(config, *quantize)
        if config.stored_dtype is None:
            raise InputError("a quantized checkpoint needs a stored dtype: pass a config with_dtype(...)")
    missing = [n for n in expected if n not in weights]
    if missing:
        raise CheckpointError(f"cannot save: weights lack {', '.join(missing[:5])}")
    check_writable_folder(out, what="checkpoint folder")
    old = sorted(out.glob("*.safetensors")) if out.is_dir() else []
    if old and not overwrite:
        raise CheckpointError(f"{out} already holds weights ({old[0].name}...): choose an empty folder or {overwrite_hint}")
    with writing(out, "checkpoint"):
        return _write_checkpoint(out, config, weights, expected, old, copy_from, max_shard_bytes, quantization)


def _write_checkpoint(out: Path, config: Gemma3Config, weights: Mapping[str, np.ndarray], expected: dict,
                      old: list[Path], copy_from: Path | None, max_shard_bytes: int,
                      quantization: Quantization | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)

    # Shard sizes from shapes and the stored dtype, so a lazily read or cast mapping is read once, below.
    itemsize = numpy_dtype(config.stored_dtype).itemsize if config.stored_dtype else None
    quantized = set(quantizable(config)) if quantization is not None else set()

    def nbytes(name: str, shape: tuple[int, ...]) -> int:
        if name in quantized:  # packed uint32 codes, then scales and biases in the stored dtype
            shapes = quantized_shapes(*shape, quantization.bits, quantization.group_size)
            return 4 * math.prod(shapes["weight"]) + 2 * itemsize * math.prod(shapes["scales"])
        return math.prod(shape) * (itemsize or np.asarray(weights[name]).itemsize)

    def tensors(names: list[str]) -> dict[str, np.ndarray]:
        """The shard's tensors under their file names: a quantized weight becomes its three tensors, made
        one weight at a time (the float source of one tensor alive at once beside the shard's results)."""
        made = {}
        for name in names:
            array = _as(weights[name], itemsize, config)
            if name in quantized:
                stem = name.removesuffix(".weight")
                made[name], made[f"{stem}.scales"], made[f"{stem}.biases"] = quantize(
                    array, quantization.bits, quantization.group_size
                )
                del array
            else:
                made[name] = array
        return made

    sizes = [(name, nbytes(name, shape)) for name, shape in expected.items()]
    shards = _shard(sizes, max_shard_bytes)
    total = sum(s for _, s in sizes)
    written: list[str] = []
    if len(shards) == 1:
        atomic_save_safetensors(out / SINGLE_FILE, tensors(shards[0]))
        written.append(SINGLE_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            made = tensors(shard)
            atomic_save_safetensors(out / filename, made)
            weight_map.update(dict.fromkeys(made, filename))
            del made
            written.append(filename)
        atomic_write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(INDEX_FILE)
    for stale in old:  # shards of an earlier save that the new one does not reuse
        if stale.name not in written:
            stale.unlink()
    if len(shards) == 1 and (out / INDEX_FILE).exists():
        (out / INDEX_FILE).unlink()

    hf_config = config.to_hf_dict()
    if quantization is not None:  # as mlx_lm.utils.quantize_model and save_config write it
        hf_config[QUANTIZATION] = quantization.entry()
        hf_config["quantization_config"] = quantization.entry()
    atomic_write_json(out / "config.json", hf_config)
    if copy_from is not None and Path(copy_from).resolve() != out.resolve():
        for name in SIDE_FILES:
            src = Path(copy_from) / name
            if src.is_file():
                atomic_write_bytes(out / name, src.read_bytes())
    if not (out / "generation_config.json").exists():
        atomic_write_json(
            out / "generation_config.json",
            {
                "bos_token_id": config.bos_token_id,
                "eos_token_id": list(config.eos_token_ids),
                "pad_token_id": config.pad_token_id,
            },
        )
    return out
