"""Commands that describe and move checkpoints: ``check``, ``info``, ``convert``, ``download``."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .. import __version__
from .app import command, console
from .common import gib, is_preset


def _memory() -> dict[str, int | None]:
    """Total and available system memory in bytes, without psutil (it is not a core dependency)."""
    total = available = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"total": total, "available": available}


@command()
def check(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Run each backend against the numpy reference.")
    ] = True,
) -> None:
    """Platform, installed backends with their versions and devices, memory, and an exactness self-test."""
    from ..backend import _registered, probe
    from ..selftest import FP32_TOLERANCE, verify_backend

    infos = [probe(name) for name in _registered()]
    errors: dict[str, float | str] = {}
    if verify:
        for i in infos:
            if i.usable:
                try:
                    errors[i.name] = verify_backend(i.name)
                except Exception as err:  # report, don't crash: check is the tool for broken installs
                    errors[i.name] = f"{type(err).__name__}: {err}"
    memory = _memory()
    report = {
        "gemmalab": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "memory": memory,
        "backends": [
            {
                "name": i.name,
                "usable": i.usable,
                "version": i.version,
                "devices": list(i.devices),
                "problem": i.problem,
                "reference_rel_error": errors.get(i.name),
            }
            for i in infos
        ],
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(f"[bold]gemmalab {__version__}[/] · Python {report['python']} · {report['platform']}")
    if memory["total"]:
        avail = f", {gib(memory['available'])} available" if memory["available"] else ""
        console.print(f"memory: {gib(memory['total'])} total{avail}")
    table = Table(title="backends")
    for column in ("backend", "status", "version", "devices", "exact vs reference (fp32)"):
        table.add_column(column)
    for i in infos:
        status = "[green]usable[/]" if i.usable else f"[red]not usable[/]: {escape(i.problem or '')}"
        error = errors.get(i.name)
        if isinstance(error, float):
            verdict = f"[green]yes[/] ({error:.1e})" if error <= FP32_TOLERANCE else f"[red]NO[/] ({error:.1e})"
        else:
            verdict = "-" if error is None else f"[red]failed[/]: {escape(error)}"
        table.add_row(i.name, status, i.version or "-", ", ".join(i.devices) or "-", verdict)
    console.print(table)
    if any(isinstance(e, str) or e > FP32_TOLERANCE for e in errors.values()):
        raise typer.Exit(1)


def _config_for_info(source: str):
    """(config, what to call the source, the folder whose weights to report or None).

    A repo id is read from the Hugging Face cache, else its config.json alone is fetched: describing a
    model never downloads its weights."""
    from .. import checkpoint
    from ..config import Gemma3Config

    if is_preset(source):
        config = Gemma3Config.preset(source)
        return config, f"preset {config.name}", None
    path = Path(source).expanduser()
    if path.exists():
        # A folder, or a config file; only a checkpoint's own config.json has weights beside it.
        folder = path if path.is_dir() else path.parent if path.name == "config.json" else None
        return Gemma3Config.from_file(path), str(path), folder
    if checkpoint._looks_like_repo_id(source):
        folder = checkpoint.locate_config(source)
        return checkpoint.load_config(folder), source, folder
    raise checkpoint.ModelNotFoundError(f"{source} is not a preset, a folder or a repo id: check the spelling")


def _size(n_bytes: int) -> str:
    """Bytes for people, with the exact count (what a script or a test compares with the files' sizes)."""
    if n_bytes < 1024:
        return f"{n_bytes} B"
    value, unit = n_bytes / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit} ({n_bytes:,} bytes)"


def _weights_rows(weights, folder: Path, repo_id: str | None) -> list[tuple[str, str]]:
    """Table rows (rich markup) for a checkpoint's weights: ``weights`` is a ``checkpoint.WeightsSummary``."""
    where = [("folder", escape(str(folder)))] if repo_id else []  # where the cache keeps it
    if weights.ok is None:
        if repo_id:
            return [("weights", f"not downloaded (the cache holds config.json only): "
                                f"`gemmalab download {escape(repo_id)}` fetches them"), *where]
        return [("weights", "none: no *.safetensors in this folder, only config.json")]
    rows = []
    if weights.files:
        names = weights.files[0] if len(weights.files) == 1 else (
            f"{len(weights.files)} shards ({weights.files[0]} ... {weights.files[-1]})")
        dtypes = ", ".join(weights.dtypes) or "-"
        rows.append(("weights", f"{escape(names)}: {_size(weights.bytes)}, {weights.tensors:,} tensors, {dtypes}"))
    verdict = ("[green]names and shapes match config.json[/]" if weights.ok
               else f"[red]not usable[/]: {escape(weights.problem or '')}")
    if weights.quantization is not None:
        from ..checkpoint import describe_quantization

        text = describe_quantization(weights.quantization)
        if weights.quantization["embedding"]:
            text += "; gemmalab.load dequantizes the embedding"
        rows.append(("quantized", escape(text)))
    return [*rows, ("weights check", verdict), *where]


@command()
def info(
    source: Annotated[str, typer.Argument(help="A preset (gemma-3-270m ...), a checkpoint folder or a Hub repo id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Shape of a model: layer pattern, attention, RoPE, parameter count and memory per dtype; for a checkpoint,
    its weights on disk (files, size, tensors, dtypes) checked against its config.json.

    Only headers are read, so it is fast on any size. A repo id is read from the Hugging Face cache, else only
    its config.json is fetched, never the weights. Exits 1 when a checkpoint's weights cannot be used.
    """
    from dataclasses import asdict

    from .. import checkpoint
    from ..dtypes import BYTES_PER_ELEMENT, DTYPES

    config, where, folder = _config_for_info(source)
    weights = None if folder is None else checkpoint.summarize_weights(folder, config)
    # A repo id: its folder is a snapshot in the Hugging Face cache, and `gemmalab download` fetches its weights.
    repo_id = source if folder is not None and not Path(source).expanduser().exists() else None
    n_params = config.num_parameters()
    embed = config.vocab_size * config.hidden_size
    # KV cache per token of context, per layer kind: keys + values, kv heads x head_dim, in bf16.
    kv_per_token = 2 * config.num_key_value_heads * config.head_dim * 2
    n_global = sum(not config.is_sliding(i) for i in range(config.num_hidden_layers))
    report = {
        "source": where,
        "folder": None if folder is None else str(folder),
        "layers": config.num_hidden_layers,
        "layer_pattern": config.describe_layers(),
        "local_layers": config.num_hidden_layers - n_global,
        "global_layers": n_global,
        "sliding_window": config.sliding_window,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "vocab_size": config.vocab_size,
        "rope_local": {"theta": config.rope_local.theta, "linear_factor": config.rope_local.factor},
        "rope_global": {"theta": config.rope_global.theta, "linear_factor": config.rope_global.factor},
        "tied_embeddings": config.tie_word_embeddings,
        "parameters": n_params,
        "embedding_parameters": embed,
        "stored_dtype": config.stored_dtype,
        "weight_bytes": {d: n_params * BYTES_PER_ELEMENT[d] for d in DTYPES},
        "kv_cache_bytes_bf16": {
            "global_per_token": kv_per_token * n_global,
            "local_max": kv_per_token * (config.num_hidden_layers - n_global) * config.sliding_window,
        },
        # None for a preset; files [] and ok None for a folder (or a cached repo) with config.json only.
        "weights": None if weights is None else asdict(weights),
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        console.print(_info_table(config, report, weights, folder, repo_id))
    if weights is not None and weights.problem:
        # The report is out (the shape is still right); the failure is the one error line after it.
        raise checkpoint.CheckpointError(weights.problem)


def _info_table(config, report: dict, weights, folder: Path | None, repo_id: str | None) -> Table:
    n_params, embed = report["parameters"], report["embedding_parameters"]
    table = Table(title=f"Gemma 3 · {escape(report['source'])}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")  # a path folds onto the next line, never cut with an ellipsis
    table.add_row("layers", f"{config.num_hidden_layers}: {config.describe_layers()} (L local, G global)")
    table.add_row("sliding window", f"{config.sliding_window} tokens on {report['local_layers']} local layers")
    table.add_row("hidden / MLP", f"{config.hidden_size} / {config.intermediate_size}")
    table.add_row(
        "attention",
        f"{config.num_attention_heads} heads, {config.num_key_value_heads} kv heads, head_dim {config.head_dim}, "
        f"scale 1/sqrt({config.query_pre_attn_scalar:g})",
    )
    table.add_row(
        "RoPE",
        f"local base {config.rope_local.theta:g} x{config.rope_local.factor:g}, "
        f"global base {config.rope_global.theta:g} x{config.rope_global.factor:g} (linear)",
    )
    table.add_row("vocabulary", f"{config.vocab_size:,} ({'tied' if config.tie_word_embeddings else 'untied'} head)")
    table.add_row("parameters", f"{n_params:,} ({embed / n_params:.0%} in the embedding)")
    for d in report["weight_bytes"]:
        table.add_row(f"weights {d}", gib(report["weight_bytes"][d]))
    kv = report["kv_cache_bytes_bf16"]
    table.add_row(
        "KV cache (bf16)",
        f"{kv['global_per_token'] / 1024:.1f} KiB per token on global layers; "
        f"local layers capped at {gib(kv['local_max'])}",
    )
    if config.stored_dtype:
        table.add_row("stored dtype", config.stored_dtype)
    if weights is not None:
        for field, value in _weights_rows(weights, folder, repo_id):
            table.add_row(field, value)
    return table


QUANTIZE_CHOICES = {"q4": 4, "q8": 8}


def _quantize_option(quantize: str | None, group_size: int | None) -> tuple[int, int] | None:
    """(bits, group size) of ``--quantize`` / ``--group-size``, or None for a dense conversion."""
    from ..errors import InputError

    if quantize is None:
        if group_size is not None:
            raise InputError("--group-size sets the quantization groups: pass it with --quantize q4 or q8")
        return None
    bits = QUANTIZE_CHOICES.get(quantize.strip().lower())
    if bits is None:
        raise InputError(f"--quantize must be q4 or q8, got {quantize!r}")
    group_size = 64 if group_size is None else group_size
    if group_size not in (32, 64, 128):
        raise InputError(f"--group-size must be 32, 64 or 128, got {group_size}")
    return bits, group_size


@command()
def convert(
    source: Annotated[str, typer.Argument(help="A checkpoint folder or Hub repo id.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the converted checkpoint to.")],
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 (bf16) or float16 (fp16).")] = "bfloat16",
    quantize: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--quantize", help="q4 or q8: write mlx-lm's quantized format (every linear and the embedding)."),
    ] = None,
    group_size: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--group-size", help="Inputs per quantization group with --quantize: 32, 64 (default) or 128."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace weights already in OUT.")] = False,
) -> None:
    """Rewrite a checkpoint as text-only Gemma3ForCausalLM safetensors in another dtype, or quantized.

    Works tensor by tensor in numpy, with no backend: multimodal checkpoints come out text-only, in the layout
    transformers and mlx-lm load. With ``--quantize q4|q8`` the output is mlx-lm's quantized format (what
    ``mlx_lm.convert -q`` writes: packed codes, scales and biases in the dtype, a ``quantization`` entry in
    config.json), which mlx_lm.load and gemmalab.load read; transformers does not read it.
    """
    from .. import checkpoint
    from ..dtypes import canonical_dtype
    from ..outputs import check_writable_folder

    target = canonical_dtype(dtype)
    quantization = _quantize_option(quantize, group_size)
    check_writable_folder(out, what="output folder")  # before reading a byte of the source
    folder = checkpoint.locate(source)
    config = checkpoint.load_config(folder)
    if quantization is not None:
        checkpoint.check_quantizable(config, *quantization)  # the group size fits every weight
    weights = checkpoint.read_weights(folder, config, quantized=True)
    if (held := weights.quantization()) is not None:
        raise checkpoint.CheckpointError(
            f"{source} is already quantized ({checkpoint.describe_quantization(held)}): convert reads dense "
            f"checkpoints; convert the dense one it was made from (gemmalab.load(SOURCE).save(DIR) writes a "
            f"dense copy)"
        )
    doing = target if quantization is None else f"{target}, {quantization[0]}-bit in groups of {quantization[1]}"
    with console.status(f"writing {out} in {doing}"):
        checkpoint.save_checkpoint(out, config.with_dtype(target), weights, copy_from=folder, overwrite=overwrite,
                                   overwrite_hint="pass --overwrite", quantize=quantization)
    aside = f"; left aside {len(weights.set_aside)} vision/duplicate tensors" if weights.set_aside else ""
    what = "" if quantization is None else f", {len(checkpoint.quantizable(config))} tensors quantized (mlx-lm's format)"
    console.print(f"wrote {out} ({config.num_parameters():,} parameters, {doing}{what}{aside})")


@command()
def download(
    repo_id: Annotated[str, typer.Argument(help="Hub repository, e.g. google/gemma-3-270m.")],
    revision: Annotated[Optional[str], typer.Option(help="Branch, tag or commit.")] = None,  # noqa: UP045
) -> None:
    """Download a checkpoint's safetensors, config and tokenizer into the Hugging Face cache."""
    from .. import checkpoint

    folder = checkpoint.locate(repo_id, revision=revision)
    config = checkpoint.load_config(folder)
    console.print(f"{repo_id} is at {folder} ({config.num_parameters():,} parameters)")
