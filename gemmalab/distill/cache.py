"""The offline teacher cache: a teacher run once over every packed training window, each position's
distribution reduced to k ids (gemmalab.distill.sparse), so a student can distil from the files instead
of a teacher in memory.

``build_cache`` writes it (``gemmalab distill cache`` is its command line); ``TeacherCache`` reads it
(cache_format.py describes the files). The windows are exactly the ones training reads, ``pack`` of the
data with the teacher's tokenizer, all of them (held-out ones too: the trainer splits them later), and a
window's inputs are ``windows[:, :-1]`` as ``make_batch`` cuts them, so position j of a cached window is
the teacher's prediction for a training Batch's ``targets[:, j]``.

A build is resumable at every moment: each shard is written under a temporary name, fsynced and renamed,
then the manifest is rewritten atomically to list it. Run again with the same arguments, a build checks
that the teacher, tokenizer, data and settings are the ones the cache was started with, checks every
listed shard against its sha256 (rebuilding a damaged one), removes what a killed build left half-written,
and goes on from the first missing shard. The work is deterministic (the same windows in the same batches,
sampling streams seeded per window), so a resumed cache is byte-identical to one built in one go.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import checkpoint
from ..backend import get_backend, resolve_backend_name
from ..checks import is_count
from ..dtypes import canonical_dtype
from ..errors import ConfigError, OutputError, RunInterrupted
from ..outputs import check_writable_folder, writing
from ..params import parameter_bytes
from ..streaming import LayerStream, check_layers_per_group, stream_logit_chunks
from ..tokenizer import Tokenizer
from ..train.data import load_documents, pack
from .cache_format import (
    MANIFEST,
    SAMPLED,
    SETTINGS,
    TOP_K,
    TeacherCache,
    build_command,
    data_fingerprint,
    expected_shards,
    new_manifest,
    read_manifest,
    shard_name,
    shard_problem,
    stray_temporaries,
    teacher_fingerprint,
    write_manifest,
    write_shard,
)
from .sparse import SparseTargets, sampled_targets, top_k_targets, window_rng

Echo = Callable[[str], None]
_EXAMPLES = {"top_k": 256, "seq_len": 256, "batch_size": 8, "shard_windows": 256, "chunk_tokens": 512}


def build_cache(
    teacher: str | Path,
    data: str | Path | None,
    out: str | Path,
    *,
    top_k: int = 256,
    sampled: bool = False,
    temperature: float = 1.0,
    seq_len: int = 256,
    batch_size: int = 8,
    shard_windows: int = 256,
    seed: int = 0,
    backend: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    chunk_tokens: int = 512,
    stream_layers: int | None = None,
    progress: bool = True,
    echo: Echo = print,
) -> Path:
    """Build (or resume, or find complete) the teacher cache of ``teacher`` over ``data`` in folder ``out``.

    ``top_k`` ids per position: the most probable ones, or with ``sampled`` ids drawn from the teacher's
    distribution at ``temperature`` (streams seeded by ``seed`` and the window index). ``seq_len`` as in
    training; ``batch_size`` windows per teacher pass; ``shard_windows`` windows per shard file (the unit a
    killed build loses at most); ``chunk_tokens`` tokens (rows x positions) per output-head chunk, which
    bounds the teacher's logits held at once to chunk_tokens x vocab floats. ``backend``, ``dtype`` (default:
    the checkpoint's stored dtype, else float32) and ``device`` choose where the teacher runs. With
    ``stream_layers`` the teacher is never whole in memory: ``stream_layers`` blocks at a time are read from its
    files and every window of a shard passes through them (gemmalab.streaming.LayerStream), the same cache for
    a fraction of the memory, at the cost of reading the weights once per shard. Returns ``out``.
    """
    _check_settings(top_k=top_k, temperature=temperature, seq_len=seq_len, batch_size=batch_size,
                    shard_windows=shard_windows, seed=seed, chunk_tokens=chunk_tokens)
    if stream_layers is not None:
        check_layers_per_group(stream_layers)
    out = check_writable_folder(out, what="cache folder", fix="choose another --out")
    folder = checkpoint.locate(teacher)
    config = checkpoint.load_config(folder)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer is None:
        raise ConfigError(f"the teacher {folder} has no tokenizer.json or tokenizer.model, and the cache's windows are "
                          "the teacher's tokens: give a teacher checkpoint that ships its tokenizer")
    if top_k > config.vocab_size:
        raise ConfigError(f"--top-k {top_k} is more than the teacher's vocabulary of {config.vocab_size} ids: lower it")
    windows, trained = pack(load_documents(data), tokenizer, seq_len)
    wanted = new_manifest(
        teacher={"source": _source_name(teacher), "fingerprint": teacher_fingerprint(folder),
                 "vocab_size": config.vocab_size},
        tokenizer=tokenizer.fingerprint,
        data={"source": _source_name(data) if data not in (None, "", "embedded") else "embedded",
              "fingerprint": data_fingerprint(windows, trained, seq_len), "windows": len(windows)},
        settings={"top_k": int(top_k), "mode": SAMPLED if sampled else TOP_K, "temperature": float(temperature),
                  "seq_len": int(seq_len), "seed": int(seed),
                  "dtype": canonical_dtype(dtype) if dtype else (config.stored_dtype or "float32"),
                  "shard_windows": int(shard_windows)},
    )
    with writing(out, "teacher cache"):
        manifest = _start_or_resume(out, wanted, echo)
        if Tokenizer.from_folder(out) is None:  # a preset student trained from the cache takes this tokenizer
            tokenizer.save(out)
        layout = expected_shards(len(windows), shard_windows)
        done = {entry["first_window"] for entry in manifest["shards"]}
        todo = [i for i, (first, _) in enumerate(layout) if first not in done]
        if not todo:
            echo(f"teacher cache {out} is complete ({len(windows)} windows in {len(layout)} shards): nothing to do")
            return out
        name = resolve_backend_name(backend)
        engine = get_backend(name)
        teacher_dtype = wanted["settings"]["dtype"]
        if stream_layers is None:
            native = engine.build(config, checkpoint.read_weights(folder, config), dtype=teacher_dtype, device=device)
            how = ""
        else:
            native = LayerStream.open(folder, layers_per_group=stream_layers, backend=name, dtype=teacher_dtype,
                                      device=device)
            how = (f", the teacher streamed {stream_layers} blocks at a time "
                   f"({native.resident_bytes() / 2**30:.2f} of {parameter_bytes(config, native.itemsize) / 2**30:.2f} GiB "
                   "of weights resident)")
        echo(f"teacher cache {out}: {len(windows)} windows of {seq_len} positions, {_mode_text(manifest)}; "
             f"{len(todo)} of {len(layout)} shards to build on {name}{how}")
        bar = _Progress(len(windows), len(windows) - sum(layout[i][1] for i in todo), progress, echo)
        try:
            for index in todo:
                first, count = layout[index]
                targets = _shard_targets(engine, native, windows[first : first + count], first, manifest["settings"],
                                         batch_size=batch_size, chunk_tokens=chunk_tokens, advance=bar.advance,
                                         phase=bar.phase)
                file = shard_name(index)
                digest = write_shard(out / file, targets, np.arange(first, first + count, dtype=np.int64))
                manifest["shards"].append({"file": file, "first_window": first, "windows": count, "sha256": digest})
                manifest["shards"].sort(key=lambda entry: entry["first_window"])
                write_manifest(out, manifest)
                bar.shard_done(file, first, count, len(manifest["shards"]), len(layout))
        except KeyboardInterrupt:
            raise RunInterrupted(f"interrupted: the teacher cache {out} keeps {len(manifest['shards'])} of "
                                 f"{len(layout)} shards; run the same command again to go on") from None
        finally:
            bar.close()
    return out


def _check_settings(**values: object) -> None:
    """Refuse a setting no build could use, before anything is read."""
    temperature = values.pop("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature must be a positive number, got {temperature!r}: pass e.g. 1.0")
    seed = values.pop("seed")
    if not is_count(seed) or seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed!r}")
    for name, value in values.items():
        if not is_count(value) or value < 1:
            flag, example = f"--{name.replace('_', '-')}", f"--{name.replace('_', '-')} {_EXAMPLES[name]}"
            if name == "chunk_tokens":  # an API setting with no flag of its own
                flag, example = name, f"{name}={_EXAMPLES[name]}"
            raise ConfigError(f"{flag} must be a positive integer, got {value!r}: pass e.g. {example}")


def _source_name(source: str | Path) -> str:
    """How the manifest names a teacher or data source: an absolute path for a local one (the build command
    it prints then works from anywhere), else as given (a Hub repo id)."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def _mode_text(manifest: dict) -> str:
    settings = manifest["settings"]
    what = f"{settings['top_k']} sampled ids" if settings["mode"] == SAMPLED else f"top-{settings['top_k']}"
    return f"{what} at temperature {settings['temperature']:g}"


# ---------------------------------------------------------------------------------------------------------
# Starting or resuming
# ---------------------------------------------------------------------------------------------------------
def _differences(old: dict, new: dict) -> list[str]:
    """What differs between the cache on disk and the one asked for, as "what X there, Y now"."""
    pairs = [
        ("teacher fingerprint", old["teacher"]["fingerprint"][:16], new["teacher"]["fingerprint"][:16]),
        ("teacher vocabulary", old["teacher"]["vocab_size"], new["teacher"]["vocab_size"]),
        ("tokenizer fingerprint", old["tokenizer"]["fingerprint"], new["tokenizer"]["fingerprint"]),
        ("data fingerprint", old["data"]["fingerprint"][:16], new["data"]["fingerprint"][:16]),
        ("data windows", old["data"]["windows"], new["data"]["windows"]),
        *[(key, old["settings"][key], new["settings"][key]) for key in SETTINGS],
    ]
    return [f"{what} {there} there, {now} now" for what, there, now in pairs if there != now]


def _start_or_resume(out: Path, wanted: dict, echo: Echo) -> dict:
    """The manifest to go on with: the one in ``out`` once it matches ``wanted`` and its damaged shards are
    dropped from it, or ``wanted`` itself, written into a new (or empty) folder."""
    if not (out / MANIFEST).is_file():
        others = [p.name for p in out.iterdir() if p not in stray_temporaries(out)] if out.is_dir() else []
        if others:
            raise OutputError(f"{out} holds files ({', '.join(sorted(others)[:3])}) but no teacher cache manifest: "
                              "choose another --out (a new or empty folder)")
        _remove_strays(out)
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, wanted)
        return wanted
    manifest = read_manifest(out)
    differences = _differences(manifest, wanted)
    if differences:
        raise ConfigError(f"{out} holds a teacher cache made differently ({'; '.join(differences)}): choose another "
                          f"--out for these settings, or go on with the command it was made with: {build_command(manifest, out)}")
    _remove_strays(out)
    layout = set(expected_shards(wanted["data"]["windows"], wanted["settings"]["shard_windows"]))
    kept = []
    for entry in manifest["shards"]:
        problem = shard_problem(out, entry)
        if problem is None and (entry["first_window"], entry["windows"]) in layout:
            kept.append(entry)
        else:
            echo(f"{problem or 'shard ' + entry['file'] + ' does not fit the layout'}: rebuilding it")
    if len(kept) != len(manifest["shards"]):
        manifest["shards"] = kept
        write_manifest(out, manifest)
    return manifest


def _remove_strays(out: Path) -> None:
    """Delete the temporary files of a killed build (never a finished file: those have their real names)."""
    if out.is_dir():
        for path in stray_temporaries(out):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# The teacher's work
# ---------------------------------------------------------------------------------------------------------
def _shard_targets(engine, teacher, windows: np.ndarray, first: int, settings: dict, *, batch_size: int,
                   chunk_tokens: int, advance: Callable[[int], None], phase: Callable[[str], None] | None = None
                   ) -> SparseTargets:
    """The sparse targets of packed windows [n, seq_len + 1] (the first one is window ``first``), computed
    ``batch_size`` windows per teacher pass and reduced chunk by chunk as the teacher (a native model, or a
    LayerStream running all of the shard's passes through each group of blocks) yields the logits.

    Every pass has the same shape: a short last batch is padded with copies of its last window (their
    results are dropped), so a compiling backend (JAX) compiles the teacher once, not once per remainder."""
    k, temperature = settings["top_k"], settings["temperature"]
    count, seq = windows.shape[0], windows.shape[1] - 1
    ids = np.empty((count, seq, k), np.int32)
    logprobs = np.empty((count, seq, k), np.float32)
    tail = np.empty((count, seq), np.float32)
    width = min(batch_size, settings["shard_windows"])  # rows per pass, the same in every shard
    positions = max(1, chunk_tokens // width)  # so a head chunk holds about chunk_tokens x vocab logits
    starts = list(range(0, count, width))
    real = [min(width, count - start) for start in starts]  # rows of each pass that are windows, not padding
    passes = []
    for start, rows in zip(starts, real, strict=True):
        inputs = windows[start : start + rows, :-1]  # [rows, seq]: make_batch's inputs
        passes.append(np.concatenate([inputs, np.repeat(inputs[-1:], width - rows, axis=0)]) if rows < width else inputs)
    streams = [window_rng(settings["seed"], first + w) for w in range(count)]  # one per window, in position order
    current = None  # the pass whose chunks are arriving; counted on the bar when the next one starts
    for index, at, logits in stream_logit_chunks(engine, teacher, passes, chunk_tokens=positions, phase=phase):
        if current is not None and current != index:
            advance(real[current])
        current = index
        start, rows = starts[index], real[index]
        logits = logits[:rows]
        span = slice(at, at + logits.shape[1])
        if settings["mode"] == SAMPLED:  # one stream per window, read in position order across chunks
            parts = [sampled_targets(logits[r], k, temperature, streams[start + r]) for r in range(rows)]
            chunk = SparseTargets(*(np.stack([getattr(p, f) for p in parts]) for f in ("ids", "logprobs", "tail")))
        else:
            chunk = top_k_targets(logits, k, temperature)
        ids[start : start + rows, span] = chunk.ids
        logprobs[start : start + rows, span] = chunk.logprobs
        tail[start : start + rows, span] = chunk.tail
    if current is not None:
        advance(real[current])
    return SparseTargets(ids, logprobs, tail)


class _Progress:
    """A rich bar over windows (windows/s, ETA) when enabled, else one plain line per finished shard."""

    def __init__(self, total: int, done: int, enabled: bool, echo: Echo):
        self.echo, self.bar = echo, None
        self.started, self.fresh = time.monotonic(), 0
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("[bold]teacher cache"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), TextColumn("{task.fields[stage]}"))
            self.task = self.bar.add_task("cache", total=total, completed=done, rate="", stage="")
            self.bar.start()

    def advance(self, windows: int) -> None:
        self.fresh += windows
        if self.bar is not None:
            rate = self.fresh / max(time.monotonic() - self.started, 1e-9)
            self.bar.update(self.task, advance=windows, rate=f"{rate:.1f} windows/s")

    def phase(self, stage: str) -> None:
        """A streamed teacher's stage (its windows advance only at the head): shown beside the bar."""
        if self.bar is not None:
            self.bar.update(self.task, stage=stage)

    def shard_done(self, file: str, first: int, count: int, shards: int, total: int) -> None:
        if self.bar is None:
            self.echo(f"{file}: windows {first}-{first + count - 1} ({shards} of {total} shards)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


__all__ = ["TeacherCache", "build_cache", "data_fingerprint"]
