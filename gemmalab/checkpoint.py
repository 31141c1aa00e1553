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
from .errors import CheckpointError, ConfigError, ModelNotFoundError
from .outputs import check_writable_folder, writing
from .params import EMBED, LM_HEAD, parameter_shapes

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


@dataclass
class Weights(Mapping):
    """Canonical name -> numpy array, read from safetensors on access (one at a time, with plain reads).

    A backend iterating over it converts tensor by tensor, so a checkpoint never sits in memory twice.
    ``read_into`` reads a tensor into the backend's own memory instead, skipping the numpy copy.
    """

    locations: dict[str, tuple[Path, str]]  # canonical name -> (file, key in file)
    set_aside: list[str] = field(default_factory=list)  # vision/projector keys not used by the text model
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)
    _headers: dict[Path, tuple[int, dict]] = field(default_factory=dict, repr=False)

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = _open(file)
        return self._handles[file]

    def __getitem__(self, name: str) -> np.ndarray:
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
        return name in self.locations  # Mapping's default would read the tensor to answer

    def subset(self, names: Iterable[str]) -> Weights:
        """The same lazy reader over ``names`` only (the weights of one stage of a partial model)."""
        return Weights({name: self.locations[name] for name in names}, [], self._handles, self._headers)

    def stored_dtype(self, name: str) -> np.dtype | None:
        """The numpy dtype ``name`` is stored in (from the file's header), or None for a dtype other than
        float32, bfloat16 and float16."""
        return _SAFETENSORS_DTYPES.get(self._entry(name)[1]["dtype"])

    def _entry(self, name: str) -> tuple[int, dict]:
        """(where the file's data begins, the header entry of ``name``: dtype, shape, data_offsets)."""
        file, key = self.locations[name]
        if file not in self._headers:
            self._headers[file] = _read_header(file)
        start, header = self._headers[file]
        return start, header[key]

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Read ``name`` from its file straight into ``out`` (C-contiguous, writable, the stored dtype and
        shape) with plain reads, no memory map: a backend that allocates its own tensor and hands its
        memory here holds each tensor once while loading. (A memory-mapped read counts the file's pages in
        the process's resident memory too, on top of the copy, until the map closes.)"""
        file, key = self.locations[name]
        data_start, entry = self._entry(name)
        begin, end = entry["data_offsets"]
        if (
            out.dtype != self.stored_dtype(name)
            or tuple(out.shape) != tuple(entry["shape"])
            or not out.flags.c_contiguous
            or out.nbytes != end - begin
        ):
            raise ValueError(
                f"read_into({name!r}) needs a C-contiguous {self.stored_dtype(name)} array of shape {tuple(entry['shape'])}, "
                f"got {out.dtype} {out.shape}"
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

    def __iter__(self) -> Iterator[str]:
        return iter(self.locations)

    def __len__(self) -> int:
        return len(self.locations)


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


def _header_shapes(handle, keys: list[str]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(handle.get_slice(key).get_shape()) for key in keys}


def read_weights(folder: Path, config: Gemma3Config) -> Weights:
    """Index every tensor of the checkpoint and validate names and shapes against ``config``, strictly.

    Shapes come from the safetensors headers, so validation reads no tensor data.
    """
    expected = parameter_shapes(config)
    locations: dict[str, tuple[Path, str]] = {}
    found_shapes: dict[str, tuple[int, ...]] = {}
    set_aside: list[str] = []
    unexpected: list[str] = []
    handles = {}
    for file in weight_files(folder):
        handle = handles[file] = _open(file)
        keys = list(handle.keys())
        for key, shape in _header_shapes(handle, keys).items():
            name = _canonical(key)
            if name == "":
                set_aside.append(key)
            elif name == LM_HEAD and config.tie_word_embeddings:
                set_aside.append(key)  # a saved copy of the tied head: the embedding matrix serves
            elif name is None or name not in expected:
                unexpected.append(f"{key} (in {file.name})")
            else:
                if name in locations:
                    raise CheckpointError(f"tensor {key} appears twice ({locations[name][0].name} and {file.name}): remove one")
                locations[name] = (file, key)
                found_shapes[name] = shape

    if EMBED not in locations and not unexpected and not locations:
        raise CheckpointError(f"{folder} holds no Gemma 3 text weights (no {EMBED}): is this a Gemma 3 checkpoint?")
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise CheckpointError(f"unexpected tensors for this config: {shown}; the weights do not belong to this config.json")
    missing = [name for name in expected if name not in locations]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"missing tensors in {folder}: {shown}; the checkpoint is incomplete, re-download it")
    for name, shape in expected.items():
        if found_shapes[name] != shape:
            file, key = locations[name]
            raise CheckpointError(
                f"tensor {key} in {file.name} has shape {list(found_shapes[name])} but config.json implies "
                f"{list(shape)}: the weights and config.json disagree"
            )
    # Reorder to the canonical order so backends and saved files list tensors the same way.
    ordered = {name: locations[name] for name in expected}
    return Weights(ordered, set_aside, handles)


@dataclass(frozen=True)
class WeightsSummary:
    """What a checkpoint folder holds in weights, from the safetensors headers alone (no tensor data read)."""

    files: list[str]  # the safetensors files (the shards the index names, when there is one)
    bytes: int  # their total size on disk
    tensors: int  # tensors in their headers, vision and duplicate tensors included
    dtypes: list[str]  # stored dtypes: float32, bfloat16, float16, or safetensors' own name (I8, ...)
    ok: bool | None  # names and shapes match the config; None: there are no weights to check
    problem: str | None  # what is wrong and the fix, when not ok


# safetensors' dtype names -> gemmalab's, for the floating-point dtypes it computes in.
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


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
    if problem is None:
        try:
            read_weights(folder, config)
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


def save_checkpoint(
    folder: str | os.PathLike,
    config: Gemma3Config,
    weights: Mapping[str, np.ndarray],
    *,
    copy_from: Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    overwrite_hint: str = "pass overwrite=True",
) -> Path:
    """Write ``weights`` (canonical names) and ``config`` as a Gemma3ForCausalLM checkpoint that
    transformers and mlx-lm load. Tensors are cast to ``config.stored_dtype`` (kept as given when it is
    None). Every file is written atomically; tokenizer and generation files are copied from ``copy_from``
    when given. Refuses to write over existing weights unless ``overwrite`` (``overwrite_hint`` is how the
    caller's user asks for that: the CLI says ``--overwrite``). A folder that cannot be written is an
    OutputError before anything is written."""
    out = Path(folder).expanduser()
    expected = parameter_shapes(config)
    missing = [n for n in expected if n not in weights]
    if missing:
        raise CheckpointError(f"cannot save: weights lack {', '.join(missing[:5])}")
    check_writable_folder(out, what="checkpoint folder")
    old = sorted(out.glob("*.safetensors")) if out.is_dir() else []
    if old and not overwrite:
        raise CheckpointError(f"{out} already holds weights ({old[0].name}...): choose an empty folder or {overwrite_hint}")
    with writing(out, "checkpoint"):
        return _write_checkpoint(out, config, weights, expected, old, copy_from, max_shard_bytes)


def _write_checkpoint(out: Path, config: Gemma3Config, weights: Mapping[str, np.ndarray], expected: dict,
                      old: list[Path], copy_from: Path | None, max_shard_bytes: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)

    # Shard sizes from shapes and the stored dtype, so a lazily read or cast mapping is read once, below.
    itemsize = numpy_dtype(config.stored_dtype).itemsize if config.stored_dtype else None
    sizes = [
        (name, math.prod(shape) * (itemsize or np.asarray(weights[name]).itemsize)) for name, shape in expected.items()
    ]
    shards = _shard(sizes, max_shard_bytes)
    total = sum(s for _, s in sizes)
    written: list[str] = []
    if len(shards) == 1:
        atomic_save_safetensors(out / SINGLE_FILE, {n: _as(weights[n], itemsize, config) for n in shards[0]})
        written.append(SINGLE_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_save_safetensors(out / filename, {n: _as(weights[n], itemsize, config) for n in shard})
            weight_map.update(dict.fromkeys(shard, filename))
            written.append(filename)
        atomic_write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(INDEX_FILE)
    for stale in old:  # shards of an earlier save that the new one does not reuse
        if stale.name not in written:
            stale.unlink()
    if len(shards) == 1 and (out / INDEX_FILE).exists():
        (out / INDEX_FILE).unlink()

    atomic_write_json(out / "config.json", config.to_hf_dict())
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
