"""The files of an offline teacher cache, and its reader.

A cache is a folder:

* ``manifest.json``: what the cache was made from and how (format version; the teacher's source,
  fingerprint and vocabulary size; the tokenizer's fingerprint; the data's fingerprint and window count;
  the settings), and ``shards``, the list of finished shard files, each with its first window, its window
  count and the sha256 of its bytes. It is rewritten atomically after each shard, so it never lists a shard
  that is not complete on disk.
* ``shard-00000.safetensors``, ...: shard i holds the packed windows [i * shard_windows, ...) in order:
  ``ids`` int32 [n, seq_len, k], ``logprobs`` float32 [n, seq_len, k], ``tail`` float32 [n, seq_len] and
  ``windows`` int64 [n] (the window indices it covers). Position j of a window is the teacher's
  distribution of the token after input j, aligned with a training Batch's ``targets[:, j]``.

Fingerprints: the teacher's is a sha256 over config.json and every weights file, name and bytes; the
data's is a sha256 over seq_len and the packed windows and trained-token flags (``data_fingerprint``, which
the trainer computes from its own windows to find out whether a cache is meant for them).

Nothing here imports an array framework.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from ..checkpoint import atomic_write_bytes, weight_files
from ..errors import CheckpointError, ConfigError, InputError
from ..tokenizer import Tokenizer
from .sparse import SparseTargets

FORMAT = "gemmalab-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
TOP_K, SAMPLED = "top-k", "sampled"
# What a resumed build must share with the one that started the cache (besides the fingerprints).
SETTINGS = ("top_k", "mode", "temperature", "seq_len", "seed", "dtype", "shard_windows")
# The dtypes of a shard's arrays. logprobs stay float32: a float16 log-probability near -10 is off by up to
# 0.004, a 0.4% error on its probability, which the KL's log ratios would carry into every gradient; float32
# keeps them to 1e-6, at twice the bytes of the ids' share (the ids need int32 for a 262k vocabulary anyway).
ARRAYS = {"ids": "int32", "logprobs": "float32", "tail": "float32", "windows": "int64"}
HASH_BLOCK = 16 * 1024 * 1024  # bytes per read while hashing: checkpoints of tens of GB are streamed


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def stray_temporaries(folder: Path) -> list[Path]:
    """Temporary files a killed build left (atomic_write_bytes names them ``.<file>.<random>.tmp``)."""
    return sorted([*folder.glob(".shard-*.tmp"), *folder.glob(f".{MANIFEST}.*.tmp")])


# ---------------------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------------------
def _hash_file(digest: Any, path: Path) -> None:
    with path.open("rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read HASH_BLOCK bytes at a time."""
    digest = hashlib.sha256()
    _hash_file(digest, path)
    return digest.hexdigest()


def teacher_fingerprint(folder: Path) -> str:
    """sha256 over the teacher checkpoint's config.json and every weights file (each name, then its bytes):
    the same fingerprint means the same model, wherever the folder is."""
    digest = hashlib.sha256()
    for path in [folder / "config.json", *weight_files(folder)]:
        digest.update(f"{path.name}\n".encode())
        _hash_file(digest, path)
    return digest.hexdigest()


def data_fingerprint(windows: np.ndarray, trained: np.ndarray, seq_len: int) -> str:
    """sha256 of the packed training data: seq_len, then the windows [n, seq_len + 1] (as int32) and their
    trained flags (as bytes of 0 and 1), in order. The builder and the trainer compute it from their own
    ``pack`` output; equal fingerprints mean window i of the cache is window i of the run."""
    windows, trained = np.asarray(windows), np.asarray(trained)
    if windows.ndim != 2 or windows.shape != trained.shape or windows.shape[1] != seq_len + 1:
        raise InputError(
            f"windows {windows.shape} and trained {trained.shape} must both be [n, seq_len + 1 = {seq_len + 1}]"
        )
    digest = hashlib.sha256(f"gemmalab-windows seq_len={int(seq_len)} shape={windows.shape}\n".encode())
    digest.update(np.ascontiguousarray(windows, dtype="<i4").tobytes())
    digest.update(np.ascontiguousarray(trained, dtype=np.bool_).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------------------
def new_manifest(*, teacher: dict, tokenizer: str, data: dict, settings: dict) -> dict:
    """A manifest with no shard yet (the module docstring lists its fields)."""
    return {"format": FORMAT, "version": VERSION, "teacher": teacher, "tokenizer": {"fingerprint": tokenizer},
            "data": data, "settings": settings, "arrays": dict(ARRAYS), "shards": []}


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))


def read_manifest(folder: Path) -> dict:
    """The manifest of the cache in ``folder``, its format checked. One line when it is missing or unreadable."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a teacher cache (no {MANIFEST}): build one with "
                              f"gemmalab distill cache --teacher SRC --out {folder}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        fields = (manifest["format"], manifest["version"], manifest["teacher"]["fingerprint"],
                  manifest["tokenizer"]["fingerprint"], manifest["data"]["fingerprint"],
                  manifest["data"]["windows"], [manifest["settings"][key] for key in SETTINGS],
                  [(entry["file"], entry["first_window"], entry["windows"], entry["sha256"]) for entry in manifest["shards"]])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is unreadable ({type(err).__name__}: {err}): delete the folder and "
                              "build the cache again, or choose another --out") from None
    if fields[0] != FORMAT or fields[1] != VERSION:
        raise CheckpointError(f"{path} is not a version-{VERSION} {FORMAT} manifest (format {fields[0]!r}, "
                              f"version {fields[1]!r}): build the cache again in another folder")
    return manifest


def expected_shards(windows: int, shard_windows: int) -> list[tuple[int, int]]:
    """(first window, window count) of every shard of a cache of ``windows`` windows."""
    return [(first, min(shard_windows, windows - first)) for first in range(0, windows, shard_windows)]


def build_command(manifest: dict, folder: Path) -> str:
    """The command that builds (or resumes: it is the same command) the cache this manifest describes."""
    settings, data = manifest["settings"], manifest["data"]
    words = ["gemmalab", "distill", "cache", "--teacher", manifest["teacher"]["source"]]
    if data.get("source") not in (None, "", "embedded"):
        words += ["--data", data["source"]]
    words += ["--out", str(folder), "--top-k", str(settings["top_k"])]
    words += ["--sampled"] if settings["mode"] == SAMPLED else []
    words += ["--temperature", repr(settings["temperature"]), "--seq-len", str(settings["seq_len"]),
              "--shard-windows", str(settings["shard_windows"]), "--seed", str(settings["seed"]),
              "--dtype", settings["dtype"]]
    return shlex.join(words)


# ---------------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------------
def write_shard(path: Path, targets: SparseTargets, windows: np.ndarray) -> str:
    """Write one shard atomically (a temporary name in the same folder, fsync, rename: a killed build never
    leaves a half-written shard under its real name) and return the sha256 of its bytes."""
    data = save({"ids": np.ascontiguousarray(targets.ids, np.int32),
                 "logprobs": np.ascontiguousarray(targets.logprobs, np.float32),
                 "tail": np.ascontiguousarray(targets.tail, np.float32),
                 "windows": np.ascontiguousarray(windows, np.int64)}, metadata={"format": FORMAT})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def shard_problem(folder: Path, entry: dict) -> str | None:
    """Why a listed shard cannot be used (missing, or not the bytes the manifest hashed), or None."""
    path = folder / entry["file"]
    if not path.is_file():
        return f"shard {entry['file']} is missing"
    if file_sha256(path) != entry["sha256"]:
        return f"shard {entry['file']} is damaged (its sha256 does not match the manifest's)"
    return None


# ---------------------------------------------------------------------------------------------------------
# The reader
# ---------------------------------------------------------------------------------------------------------
class TeacherCache:
    """A finished teacher cache, open for reading. ``open`` checks it whole; ``check`` that it was made for
    this run; ``targets`` gathers the sparse targets of any windows (memory-mapped: only those are read)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._shards = sorted(manifest["shards"], key=lambda entry: entry["first_window"])
        self._firsts = [entry["first_window"] for entry in self._shards]
        self._handles: dict[str, Any] = {}

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> TeacherCache:
        """The cache in folder ``path``. Refused in one line when its manifest is missing or unreadable, when
        it is incomplete, or when a shard is missing or (with ``verify``, reading every shard once) damaged:
        the line gives the build command, which resumes and rebuilds what is missing or damaged."""
        folder = Path(path).expanduser()
        manifest = read_manifest(folder)
        cache = cls(folder, manifest)
        command = build_command(manifest, folder)
        wanted = expected_shards(cache.windows, manifest["settings"]["shard_windows"])
        have = [(entry["first_window"], entry["windows"]) for entry in cache._shards]
        if have != wanted:
            raise CheckpointError(f"the teacher cache {folder} is incomplete ({len(have)} of {len(wanted)} shards): "
                                  f"finish it with {command} (it resumes)")
        for entry in cache._shards:
            problem = (shard_problem(folder, entry) if verify
                       else None if (folder / entry["file"]).is_file() else f"shard {entry['file']} is missing")
            if problem:
                raise CheckpointError(f"the teacher cache {folder} is damaged: {problem}; rebuild it with "
                                      f"{command} (it resumes, rebuilding that shard)")
        return cache

    # -- what it holds ---------------------------------------------------------------------------------------
    @property
    def windows(self) -> int:
        return int(self.manifest["data"]["windows"])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["settings"]["seq_len"])

    @property
    def top_k(self) -> int:
        return int(self.manifest["settings"]["top_k"])

    @property
    def sampled(self) -> bool:
        return self.manifest["settings"]["mode"] == SAMPLED

    @property
    def temperature(self) -> float:
        return float(self.manifest["settings"]["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["teacher"]["vocab_size"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def data_fingerprint(self) -> str:
        return self.manifest["data"]["fingerprint"]

    @property
    def teacher_fingerprint(self) -> str:
        return self.manifest["teacher"]["fingerprint"]

    def tokenizer(self) -> Tokenizer | None:
        """The teacher's tokenizer, saved beside the shards (a preset student takes it)."""
        return Tokenizer.from_folder(self.path)

    # -- is it this run's? -----------------------------------------------------------------------------------
    def check(self, *, tokenizer_fingerprint: str | None = None, data_fingerprint: str | None = None,
              vocab_size: int | None = None) -> None:
        """Refuse, in one line naming both values, a cache made for other data, another tokenizer or another
        vocabulary than the run's (each checked when given)."""
        rebuild = f"build a cache for this run (gemmalab distill cache ... --out NEW) or train on what {self.path} was made for"
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != self.tokenizer_fingerprint:
            raise ConfigError(f"the teacher cache {self.path} was made with another tokenizer (fingerprint "
                              f"{self.tokenizer_fingerprint}, this run's is {tokenizer_fingerprint}): {rebuild}")
        if vocab_size is not None and int(vocab_size) != self.vocab_size:
            raise ConfigError(f"the teacher cache {self.path} was made for a vocabulary of {self.vocab_size} ids, "
                              f"this run's has {int(vocab_size)}: {rebuild}")
        if data_fingerprint is not None and data_fingerprint != self.data_fingerprint:
            raise ConfigError(f"the teacher cache {self.path} was made for other data (data fingerprint "
                              f"{self.data_fingerprint}, this run's windows give {data_fingerprint}): {rebuild}")

    # -- reading ---------------------------------------------------------------------------------------------
    def targets(self, window_indices: Iterable[int] | np.ndarray) -> SparseTargets:
        """The sparse targets of packed windows ``window_indices`` (any order, repeats allowed), gathered
        across shards: ids [len, seq_len, k], logprobs [len, seq_len, k], tail [len, seq_len]."""
        indices = np.asarray(window_indices).reshape(-1)
        if indices.size and (not np.issubdtype(indices.dtype, np.integer) or indices.min() < 0
                             or indices.max() >= self.windows):
            raise InputError(f"window indices must be integers in [0, {self.windows}) for the teacher cache "
                             f"{self.path}, got {indices.min()} to {indices.max()}")
        k, seq = self.top_k, self.seq_len
        ids = np.empty((len(indices), seq, k), np.int32)
        logprobs = np.empty((len(indices), seq, k), np.float32)
        tail = np.empty((len(indices), seq), np.float32)
        for row, window in enumerate(indices.tolist()):
            entry = self._shards[bisect.bisect_right(self._firsts, window) - 1]
            handle = self._handle(entry["file"])
            at = window - entry["first_window"]
            ids[row] = handle.get_slice("ids")[at : at + 1][0]
            logprobs[row] = handle.get_slice("logprobs")[at : at + 1][0]
            tail[row] = handle.get_slice("tail")[at : at + 1][0]
        return SparseTargets(ids, logprobs, tail)

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="numpy")
            except (OSError, SafetensorError) as err:
                raise CheckpointError(f"the teacher cache shard {self.path / file} is unreadable ({err}): rebuild "
                                      f"it with {build_command(self.manifest, self.path)} (it resumes)") from None
        return self._handles[file]

    def __repr__(self) -> str:
        mode = f"{self.top_k} sampled ids" if self.sampled else f"top-{self.top_k}"
        return f"TeacherCache({str(self.path)!r}, {self.windows} windows of {self.seq_len}, {mode}, T={self.temperature})"


__all__ = [
    "MANIFEST",
    "TeacherCache",
    "build_command",
    "data_fingerprint",
    "expected_shards",
    "file_sha256",
    "new_manifest",
    "read_manifest",
    "shard_name",
    "teacher_fingerprint",
    "write_manifest",
    "write_shard",
]
