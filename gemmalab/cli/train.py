"""``gemmalab train`` and ``gemmalab eval``: training runs and their scores."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .app import app, console
from .common import BackendOption, DeviceOption, open_model


@app.command()
def train(
    config_file: Annotated[Optional[Path], typer.Option("--config", help="A YAML file of training settings.")] = None,  # noqa: UP045
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="Override any setting: --set key=value (repeatable).")] = None,  # noqa: UP045
    preset: Annotated[Optional[str], typer.Option(help="Train from random init of a preset (default: tiny, byte-level).")] = None,  # noqa: UP045
    model: Annotated[Optional[str], typer.Option("--model", help="Fine-tune a checkpoint folder or Hub repo id.")] = None,  # noqa: UP045
    data: Annotated[Optional[str], typer.Option(help="Text file, .jsonl (text or chat messages) or folder (default: the embedded corpus).")] = None,  # noqa: UP045
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,  # noqa: UP045
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Sequences per micro-batch.")] = None,  # noqa: UP045
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-batches per step.")] = None,  # noqa: UP045
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per sequence.")] = None,  # noqa: UP045
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,  # noqa: UP045
    optimizer: Annotated[Optional[str], typer.Option(help="adamw or adafactor.")] = None,  # noqa: UP045
    backend: BackendOption = None,
    device: DeviceOption = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the init and the data order.")] = None,  # noqa: UP045
    out: Annotated[Optional[str], typer.Option(help="Run folder: metrics.jsonl, tensorboard/, checkpoints/.")] = None,  # noqa: UP045
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help="Steps between checkpoints (0 = at the end).")] = None,  # noqa: UP045
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train or fine-tune a model: full-parameter training with AdamW or Adafactor on any backend."""
    from ..train import TrainConfig, checkpoints
    from ..train import train as run_training

    flags = {
        "preset": preset, "model": model, "data": data, "steps": steps, "batch_size": batch_size,
        "grad_accum": grad_accum, "seq_len": seq_len, "lr": lr, "optimizer": optimizer, "backend": backend,
        "device": device, "seed": seed, "out": out, "checkpoint_every": checkpoint_every, "resume": resume or None,
    }
    config = TrainConfig.from_sources(config_file, sets, flags)
    if config.resume and (last := checkpoints.latest(Path(config.out))) is not None:
        # the run's own settings first, so `--out DIR --resume` is enough; what is given here overrides them
        config = TrainConfig.from_sources(config_file, sets, flags, base=checkpoints.read_state(last)["config"])
    source = config.model or f"preset {config.preset} (random init)"
    console.print(f"training {escape(source)} for {config.steps} steps -> {escape(config.out)}")
    result = run_training(config, progress=not quiet and console.is_terminal, echo=console.print)
    summary = f"done: step {result.steps}, loss {result.final_loss:.4f}"
    if result.eval_loss is not None:
        summary += f", held-out loss {result.eval_loss:.4f} (perplexity {math.exp(min(result.eval_loss, 700)):.2f})"
    console.print(summary)
    # One line each, never wrapped: paths are for copying.
    console.print(f"checkpoint: {escape(str(result.checkpoint))}", soft_wrap=True)
    console.print(f"metrics: {escape(str(result.run_dir / 'metrics.jsonl'))}", soft_wrap=True)


@app.command("eval")
def eval_command(
    source: Annotated[str, typer.Argument(help="A checkpoint folder, a Hub repo id, or a preset (random weights).")],
    data: Annotated[Optional[str], typer.Option(help="Text file, .jsonl or folder (default: the embedded corpus).")] = None,  # noqa: UP045
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per batch.")] = 8,
    max_batches: Annotated[Optional[int], typer.Option("--max-batches", help="Stop after this many batches.")] = None,  # noqa: UP045
    backend: BackendOption = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = "float32",
    device: DeviceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Perplexity and tokens/s of a model on a data source."""
    from ..train.evaluation import perplexity

    model = open_model(source, backend, dtype, device)
    result = perplexity(model, data, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches,
                        progress=not as_json and console.is_terminal)
    if as_json:
        print(json.dumps({"source": source, "backend": model.backend, **result.as_dict()}))
        return
    console.print(
        f"{escape(source)} on {model.backend}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f} "
        f"over {result.tokens:,} tokens ({result.tokens_per_s:,.0f} tokens/s)"
    )
