"""``gemmalab lora``: LoRA and DoRA adapters on disk (gemmalab.adapters): ``export`` converts an adapter between
PEFT's format and mlx-lm's, ``merge`` merges one into a base checkpoint. Neither needs a backend: the work is
numpy, so importing this module imports no array framework."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .app import command, console, group

lora_app = group("lora", "LoRA/DoRA adapters: convert between PEFT's and mlx-lm's formats, merge into a checkpoint.")

AdapterArgument = Annotated[str, typer.Argument(
    help="An adapter folder: PEFT's (adapter_config.json + adapter_model.safetensors) or mlx-lm's "
         "(adapter_config.json + adapters.safetensors).")]
OverwriteFlag = Annotated[bool, typer.Option("--overwrite", help="Replace what OUT already holds (an adapter of the same format, or weights).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print what was written as JSON for machines.")]


def load_adapter_source(path: str | Path):
    """The adapter (gemmalab.lora.Adapter) a ``gemmalab lora`` command works on. Today: an adapter folder in
    PEFT's or mlx-lm's format (or a file in one). Other sources (a training run's checkpoint) go here."""
    from ..adapters import WHAT_IS_AN_ADAPTER, detect_format, read_adapter
    from ..errors import InputError

    source = Path(path).expanduser()
    if detect_format(source) is None:
        why = "does not exist" if not source.exists() else "is not an adapter"
        raise InputError(f"{source} {why}: `gemmalab lora` reads {WHAT_IS_AN_ADAPTER}")
    return read_adapter(source)


def _summary(adapter) -> dict:
    config = adapter.config
    return {"kind": config.kind, "rank": config.rank, "alpha": config.alpha, "rslora": config.rslora,
            "scale": config.scale, "linears": len(adapter.tensors), "settings": config.describe()}


def _print(as_json: bool, record: dict, line: str) -> None:
    if as_json:
        print(json.dumps(record, indent=2))
    else:
        console.print(escape(line), soft_wrap=True)


@command("export", on=lora_app)
def export(
    adapter: AdapterArgument,
    out: Annotated[Path, typer.Argument(help="The adapter folder to write (new or empty; --overwrite replaces an adapter of the same format).")],
    format: Annotated[str, typer.Option("--format", "-f", help="peft (PeftModel.from_pretrained loads it) or mlx (mlx_lm.load(..., adapter_path=) loads it).")],  # noqa: A002
    base: Annotated[Optional[str], typer.Option("--base", help="The base checkpoint (folder or Hub repo id): checks the adapter's shapes, and tells mlx-lm's num_layers where the top block is (needed for an adapter of some blocks only).")] = None,  # noqa: UP045
    overwrite: OverwriteFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Convert an adapter to PEFT's or mlx-lm's format, its tensors unchanged (as float32)."""
    from .. import adapters, checkpoint

    fmt = adapters.check_format(format)
    model = checkpoint.load_config(checkpoint.locate(base)) if base is not None else None
    source = load_adapter_source(adapter)
    options = {"model": model, "overwrite": overwrite, "overwrite_hint": "pass --overwrite"}
    if fmt == adapters.PEFT and base is not None:
        options["base_model_name_or_path"] = base
    written = adapters.write_adapter(source, out, fmt, **options)
    record = {"adapter": str(adapter), "out": str(written), "format": fmt, **_summary(source)}
    _print(as_json, record, f"wrote {written} ({adapters.LABELS[fmt]} format: {record['linears']} linears, "
                            f"{source.config.describe()})")


@command("merge", on=lora_app)
def merge(
    base: Annotated[str, typer.Argument(help="The base checkpoint: a folder in Hugging Face's layout, or a cached Hub repo id.")],
    adapter: AdapterArgument,
    out: Annotated[Path, typer.Argument(help="The folder to write the merged checkpoint to.")],
    overwrite: OverwriteFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Merge an adapter into its base: an ordinary checkpoint (the base's config, dtype and tokenizer files) that transformers and mlx-lm load without PEFT."""
    from .. import adapters
    from ..outputs import check_writable_folder

    check_writable_folder(out, what="output folder")  # before reading a byte
    source = load_adapter_source(adapter)
    with console.status(f"merging {len(source.tensors)} linears into {base}"):
        written = adapters.merge_checkpoint(base, source, out, overwrite=overwrite, overwrite_hint="pass --overwrite")
    record = {"base": base, "adapter": str(adapter), "out": str(written), **_summary(source)}
    _print(as_json, record, f"wrote {written} ({base} with {record['linears']} linears merged: "
                            f"{source.config.describe()})")
