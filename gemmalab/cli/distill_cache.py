"""``gemmalab distill cache``: build (or resume) an offline teacher cache (gemmalab.distill.cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .app import command, console
from .common import BackendOption, DeviceOption
from .distill import distill_app
from .train import _echo  # the `distill` group: `gemmalab distill` itself runs a distillation


@command("cache", on=distill_app)
def cache(
    teacher: Annotated[str, typer.Option("--teacher", help="The teacher: a checkpoint folder or Hub repo id, with its tokenizer.")],
    out: Annotated[Path, typer.Option("--out", help="The cache folder (run again with the same arguments to resume a build).")],
    data: Annotated[Optional[str], typer.Option("--data", help="Text file, .jsonl or folder, as `gemmalab train --data` reads it (default: the embedded corpus).")] = None,  # noqa: UP045
    top_k: Annotated[int, typer.Option("--top-k", help="Teacher ids kept per position.")] = 256,
    sampled: Annotated[bool, typer.Option("--sampled", help="Keep ids sampled from the teacher (unbiased estimator) instead of its top-k.")] = False,
    temperature: Annotated[float, typer.Option("--temperature", help="Temperature of the teacher's distribution (the student's loss uses the same).")] = 1.0,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per training window, as in training.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per teacher pass.")] = 8,
    shard_windows: Annotated[int, typer.Option("--shard-windows", help="Windows per shard file (what a killed build can lose at most).")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampled ids (--sampled).")] = 0,
    backend: BackendOption = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="The teacher's compute dtype: float32, bfloat16 or float16 (default: the checkpoint's).")] = None,  # noqa: UP045
    device: DeviceOption = None,
    stream_layers: Annotated[Optional[int], typer.Option("--stream-layers", help="Never hold the whole teacher: read this many blocks at a time from its files, every window of a shard passing through each group (for a teacher larger than memory; same cache).")] = None,  # noqa: UP045
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar: a plain line per shard.")] = False,
) -> None:
    """Build an offline teacher cache for distillation: the teacher's top-k (or k sampled) ids per position.

    The teacher runs once over every training window (the windows `gemmalab distill` trains on: the same
    --data and --seq-len), and each position's top-k ids and log-probabilities plus the tail mass (or, with
    --sampled, k ids drawn from its distribution) go into shard files, so a student can distil without the
    teacher in memory. A killed build resumes when run again with the same arguments; a finished cache is
    left as it is. With --stream-layers N only N blocks of the teacher are in memory at a time.
    """
    from ..distill.cache import build_cache
    from ..distill.cache_format import read_manifest

    folder = build_cache(teacher, data, out, top_k=top_k, sampled=sampled, temperature=temperature, seq_len=seq_len,
                         batch_size=batch_size, shard_windows=shard_windows, seed=seed, backend=backend, dtype=dtype,
                         device=device, stream_layers=stream_layers, progress=not quiet and console.is_terminal, echo=_echo)
    manifest = read_manifest(folder)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    console.print(f"teacher cache: {escape(str(folder))}", soft_wrap=True)
    console.print(f"{manifest['data']['windows']} windows of {manifest['settings']['seq_len']} positions in "
                  f"{len(manifest['shards'])} shards, {_size(size)} on disk")


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} bytes"
