"""``gemmalab train`` and ``gemmalab eval``: training runs and their scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..train.config import TrainConfig
from ..train.losses import perplexity_from_loss
from .app import command, console
from .common import BackendOption, DeviceOption, open_model, resolve_source


def _h(name: str) -> str:
    """A flag's help: the setting's meaning and its default, from TrainConfig (one source of truth)."""
    return TrainConfig.meaning(name)


# The flags `gemmalab train` and `gemmalab distill` share, each a training setting under its own name.
DataFlag = Annotated[Optional[str], typer.Option(help=_h("data"))]  # noqa: UP045
StepsFlag = Annotated[Optional[int], typer.Option(help=_h("steps"))]  # noqa: UP045
BatchSizeFlag = Annotated[Optional[int], typer.Option("--batch-size", help=_h("batch_size"))]  # noqa: UP045
GradAccumFlag = Annotated[Optional[int], typer.Option("--grad-accum", help=_h("grad_accum"))]  # noqa: UP045
SeqLenFlag = Annotated[Optional[int], typer.Option("--seq-len", help=_h("seq_len"))]  # noqa: UP045
LrFlag = Annotated[Optional[float], typer.Option(help=_h("lr"))]  # noqa: UP045
SeedFlag = Annotated[Optional[int], typer.Option(help=_h("seed"))]  # noqa: UP045
CheckpointEveryFlag = Annotated[Optional[int], typer.Option("--checkpoint-every", help=_h("checkpoint_every"))]  # noqa: UP045
LogEveryFlag = Annotated[Optional[int], typer.Option("--log-every", help=_h("log_every"))]  # noqa: UP045
ExtendFlag = Annotated[bool, typer.Option("--extend", help="With --resume and a larger --steps: train on, the extra steps as a new schedule cycle.")]
QuietFlag = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or progress lines.")]


def precision_of(dtype: str | None) -> str | None:
    """The precision setting of a --dtype flag (fp32, bf16, fp16), or None when no flag was given."""
    from ..dtypes import canonical_dtype

    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[canonical_dtype(dtype)] if dtype else None


def run_settings(config_class: type[TrainConfig], config_file: Path | None, sets: list[str] | None,
                 flags: dict) -> TrainConfig:
    """The run's settings from a YAML file, --set and the flags. With --resume, the run's own saved settings
    come first, so `--out DIR --resume` is enough; whatever is given here overrides them."""
    from ..train.loop import saved_settings

    config = config_class.from_sources(config_file, sets, flags)
    if config.resume and (settings := saved_settings(Path(config.out).expanduser())) is not None:
        config = config_class.from_sources(config_file, sets, flags, base=settings)
    return config


def print_settings(config_class: type[TrainConfig]) -> None:
    """The table of every setting of ``config_class`` (``--list-settings``), then exit."""
    table = Table(title=f"{config_class.command} settings (YAML keys, --set key=value, and flags where one exists)")
    for column in ("setting", "type", "default"):
        table.add_column(column, no_wrap=True)
    table.add_column("meaning", ratio=1)
    for name, kind, default, meaning in config_class.settings():
        shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        table.add_row(name, kind, shown, meaning)
    console.print(table)
    console.print("optional settings take none (or null); flags win over --set, which wins over --config")
    raise typer.Exit()


def _list_settings(value: bool) -> None:
    if value:
        print_settings(TrainConfig)


@command()
def train(
    config_file: Annotated[Optional[Path], typer.Option("--config", help="A YAML file of training settings (keys: --list-settings).")] = None,  # noqa: UP045
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="Override any setting: --set key=value (repeatable; keys: --list-settings).")] = None,  # noqa: UP045
    list_settings: Annotated[bool, typer.Option("--list-settings", callback=_list_settings, is_eager=True, help="List every setting with its type, default and meaning, and exit.")] = False,
    preset: Annotated[Optional[str], typer.Option(help=_h("preset"))] = None,  # noqa: UP045
    model: Annotated[Optional[str], typer.Option("--model", help=_h("model"))] = None,  # noqa: UP045
    lora: Annotated[Optional[str], typer.Option("--lora", help=_h("lora"))] = None,  # noqa: UP045
    data: DataFlag = None,
    steps: StepsFlag = None,
    batch_size: BatchSizeFlag = None,
    grad_accum: GradAccumFlag = None,
    seq_len: SeqLenFlag = None,
    lr: LrFlag = None,
    optimizer: Annotated[Optional[str], typer.Option(help=_h("optimizer"))] = None,  # noqa: UP045
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Compute dtype: float32, bfloat16 or float16 (sets precision; master weights stay float32) (default: float32)")] = None,  # noqa: UP045
    backend: BackendOption = None,
    device: DeviceOption = None,
    seed: SeedFlag = None,
    out: Annotated[Optional[str], typer.Option(help=_h("out"))] = None,  # noqa: UP045
    checkpoint_every: CheckpointEveryFlag = None,
    log_every: LogEveryFlag = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint, with its own settings, on the backend that wrote it unless --backend chooses another.")] = False,
    extend: ExtendFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Train or fine-tune a model: full-parameter training with AdamW or Adafactor on any backend, or a LoRA / DoRA adapter on a frozen model (--lora).

    On a terminal a progress bar shows loss, tokens/s, learning rate and ETA; otherwise (a log file, nohup, a batch scheduler) a plain line every --log-every steps. Ctrl-C stops after the step in progress and keeps a checkpoint to resume from.
    """
    from ..train import train as run_training

    precision = precision_of(dtype)
    flags = {
        "preset": preset, "model": model, "lora": lora, "data": data, "steps": steps, "batch_size": batch_size,
        "grad_accum": grad_accum, "seq_len": seq_len, "lr": lr, "optimizer": optimizer, "precision": precision,
        "backend": backend, "device": device, "seed": seed, "out": out, "checkpoint_every": checkpoint_every,
        "log_every": log_every, "resume": resume or None, "extend": extend or None,
    }
    config = run_settings(TrainConfig, config_file, sets, flags)
    source = config.model or f"preset {config.preset} (random init)"
    if config.lora is not None:
        source = f"a {config.lora_config.kind} adapter ({config.lora}) on {source}"
    console.print(f"training {escape(source)} for {config.steps} steps -> {escape(config.out)}", soft_wrap=True)
    result = run_training(config, progress=not quiet and console.is_terminal, echo=_echo,
                          log_lines=not quiet and not console.is_terminal)
    summary = f"done: step {result.steps}, loss {result.final_loss:.4f}"
    if result.eval_loss is not None:
        summary += f", held-out loss {result.eval_loss:.4f} (perplexity {perplexity_from_loss(result.eval_loss):.2f})"
    console.print(summary)
    # One line each, never wrapped: paths are for copying.
    console.print(f"checkpoint: {escape(str(result.checkpoint))}", soft_wrap=True)
    console.print(f"metrics: {escape(str(result.run_dir / 'metrics.jsonl'))}", soft_wrap=True)


def _echo(message: str) -> None:
    console.print(escape(message), soft_wrap=True)


@command("eval")
def eval_command(
    source: Annotated[str, typer.Argument(help="A checkpoint folder, a Hub repo id, or a preset (random weights).")],
    data: Annotated[Optional[str], typer.Option(help="Text file, .jsonl or folder (default: a run checkpoint's own data, else the embedded corpus).")] = None,  # noqa: UP045
    split: Annotated[str, typer.Option("--split", help="held-out: the windows `gemmalab train` held out; all: every window; auto: held-out for a run's checkpoint on its own data, else all.")] = "auto",
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per window (default: the run's, else 256).")] = None,  # noqa: UP045
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per batch.")] = 8,
    max_batches: Annotated[Optional[int], typer.Option("--max-batches", help="Stop after this many batches (default: all).")] = None,  # noqa: UP045
    backend: BackendOption = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = "float32",
    device: DeviceOption = None,
    stream_layers: Annotated[Optional[int], typer.Option("--stream-layers", help="Never hold the whole model: read this many blocks at a time from its files, every batch passing through each group (for a model larger than memory; same figures).")] = None,  # noqa: UP045
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Loss, perplexity and tokens/s of a model on data: by default a training run's checkpoint is scored on
    the run's held-out windows, anything else on all of the data."""
    from ..train.evaluation import perplexity, plan_eval, streamed_perplexity

    resolved = resolve_source(source)
    plan = plan_eval(resolved.folder, data, seq_len, split, max_positions=resolved.config.max_position_embeddings)
    if stream_layers is None:
        model = open_model(resolved, backend, dtype, device)
        backend_name = model.backend
        result = perplexity(model, batch_size=batch_size, max_batches=max_batches, plan=plan,
                            progress=not as_json and console.is_terminal)
    else:
        from ..backend import resolve_backend_name
        from ..errors import ConfigError
        from ..streaming import LayerStream, check_layers_per_group

        check_layers_per_group(stream_layers)
        if resolved.folder is None:
            raise ConfigError(f"--stream-layers reads a checkpoint's files, and {source} is a preset: give a checkpoint folder")
        backend_name = resolve_backend_name(backend)
        stream = LayerStream.open(resolved.folder, layers_per_group=stream_layers, backend=backend_name, dtype=dtype,
                                  device=device)
        phase = (lambda text: console.print(f"eval: {text}")) if not as_json and console.is_terminal else None
        result = streamed_perplexity(stream, resolved.tokenizer, plan=plan, batch_size=batch_size,
                                     max_batches=max_batches, phase=phase)
    if as_json:
        print(json.dumps({"source": source, "backend": backend_name, **result.as_dict()}))
        return
    console.print(
        f"{escape(source)} on {backend_name}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f} "
        f"over {result.tokens:,} tokens of {escape(result.scored)} ({result.tokens_per_s:,.0f} tokens/s)",
        soft_wrap=True,
    )
