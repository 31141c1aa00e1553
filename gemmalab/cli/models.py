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
from ..errors import GemmalabError
from .app import app, console
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


@app.command()
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
    from .. import checkpoint
    from ..config import PRESETS, Gemma3Config

    if is_preset(source):
        return Gemma3Config.preset(source), f"preset {Gemma3Config.preset(source).name}"
    path = Path(source).expanduser()
    if path.exists():
        return Gemma3Config.from_file(path), str(path)
    if checkpoint._looks_like_repo_id(source):
        # Only config.json is needed to describe a model: do not download its weights.
        from huggingface_hub import hf_hub_download

        try:
            return Gemma3Config.from_file(hf_hub_download(source, "config.json")), source
        except Exception as err:
            if isinstance(err, GemmalabError):
                raise
            raise checkpoint.ModelNotFoundError(
                f"cannot read config.json of {source} ({type(err).__name__}): check the name and network, "
                f"or pass a local folder or a preset ({', '.join(PRESETS)})"
            ) from None
    raise checkpoint.ModelNotFoundError(f"{source} is not a preset, a folder or a repo id: check the spelling")


@app.command()
def info(
    source: Annotated[str, typer.Argument(help="A preset (gemma-3-270m ...), a checkpoint folder or a Hub repo id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Shape of a model: layer pattern, attention, RoPE, parameter count and memory per dtype."""
    from ..dtypes import BYTES_PER_ELEMENT, DTYPES

    config, where = _config_for_info(source)
    n_params = config.num_parameters()
    embed = config.vocab_size * config.hidden_size
    # KV cache per token of context, per layer kind: keys + values, kv heads x head_dim, in bf16.
    kv_per_token = 2 * config.num_key_value_heads * config.head_dim * 2
    n_global = sum(not config.is_sliding(i) for i in range(config.num_hidden_layers))
    report = {
        "source": where,
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
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"Gemma 3 · {where}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
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
    for d in DTYPES:
        table.add_row(f"weights {d}", gib(report["weight_bytes"][d]))
    kv = report["kv_cache_bytes_bf16"]
    table.add_row(
        "KV cache (bf16)",
        f"{kv['global_per_token'] / 1024:.1f} KiB per token on global layers; "
        f"local layers capped at {gib(kv['local_max'])}",
    )
    if config.stored_dtype:
        table.add_row("stored dtype", config.stored_dtype)
    console.print(table)


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="A checkpoint folder or Hub repo id.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the converted checkpoint to.")],
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 (bf16) or float16 (fp16).")] = "bfloat16",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace weights already in OUT.")] = False,
) -> None:
    """Rewrite a checkpoint as text-only Gemma3ForCausalLM safetensors in another dtype.

    Works tensor by tensor in numpy, with no backend: multimodal checkpoints come out text-only, in the layout
    transformers and mlx-lm load.
    """
    from .. import checkpoint
    from ..dtypes import canonical_dtype
    from ..outputs import check_writable_folder

    target = canonical_dtype(dtype)
    check_writable_folder(out, what="output folder")  # before reading a byte of the source
    folder = checkpoint.locate(source)
    config = checkpoint.load_config(folder)
    weights = checkpoint.read_weights(folder, config)
    with console.status(f"writing {out} in {target}"):
        checkpoint.save_checkpoint(out, config.with_dtype(target), weights, copy_from=folder, overwrite=overwrite,
                                   overwrite_hint="pass --overwrite")
    aside = f"; left aside {len(weights.set_aside)} vision/duplicate tensors" if weights.set_aside else ""
    console.print(f"wrote {out} ({config.num_parameters():,} parameters, {target}{aside})")


@app.command()
def download(
    repo_id: Annotated[str, typer.Argument(help="Hub repository, e.g. google/gemma-3-270m.")],
    revision: Annotated[Optional[str], typer.Option(help="Branch, tag or commit.")] = None,  # noqa: UP045
) -> None:
    """Download a checkpoint's safetensors, config and tokenizer into the Hugging Face cache."""
    from .. import checkpoint

    folder = checkpoint.locate(repo_id, revision=revision)
    config = checkpoint.load_config(folder)
    console.print(f"{repo_id} is at {folder} ({config.num_parameters():,} parameters)")
