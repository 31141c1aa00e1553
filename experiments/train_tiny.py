"""train-tiny: the `tiny` preset (6 layers, byte-level vocabulary) trained from random init on the embedded
corpus, with a held-out split; reports the held-out perplexity it reaches and its training speed.

    gemmalab experiments run train-tiny [--out DIR] [--set steps=400] [--set backend=jax]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemmalab.backend import resolve_backend_name
from gemmalab.experiments import Experiment
from gemmalab.experiments.plots import columns, line_plot
from gemmalab.train import TrainConfig, train
from gemmalab.train.losses import perplexity_from_loss


def run(settings: dict[str, Any], out: Path, progress, log) -> dict[str, Any]:
    config = TrainConfig.from_dict({**settings, "out": str(out / "run")})
    backend = resolve_backend_name(config.backend)
    log(f"training the {config.preset} preset for {config.steps} steps on {backend}")
    curve: list[tuple[int, float]] = []
    held_out: list[tuple[int, float]] = []

    def on_step(record: dict) -> None:
        curve.append((record["step"], record["loss"]))
        if "eval_loss" in record:
            held_out.append((record["step"], record["eval_loss"]))
        progress("train", record["step"], config.steps, f"loss {record['loss']:.3f}")

    result = train(config, progress=False, echo=log, on_step=on_step)
    if result.eval_loss is not None:
        held_out.append((result.steps, result.eval_loss))
    plot = line_plot(
        out / "loss.png",
        {"training loss": columns(curve), "held-out loss": columns(held_out)},
        title=f"train-tiny: {config.preset} on the embedded corpus ({backend})",
        xlabel="step",
        ylabel="loss (nats per token)",
    )
    speeds = [r["tokens_per_s"] for r in result.history if "tokens_per_s" in r]
    return {
        "eval_perplexity": perplexity_from_loss(result.eval_loss) if result.eval_loss is not None else None,
        "eval_loss": result.eval_loss,
        "final_loss": result.final_loss,
        "first_loss": curve[0][1] if curve else None,
        "tokens_per_s": speeds[-1] if speeds else None,
        "steps": result.steps,
        "backend": backend,
        "checkpoint": str(result.checkpoint),
        "plot": plot.name,
    }


EXPERIMENT = Experiment(
    name="train-tiny",
    summary="Train the tiny preset from scratch on the embedded corpus: held-out perplexity and speed.",
    config="configs/train-tiny.yaml",
    expected="about 1 minute on PyTorch (2 CPU cores); about 8 on the Linux MLX CPU build",
    run=run,
    headline=("eval_perplexity", "final_loss", "tokens_per_s", "backend"),
    smoke={
        "steps": 4,
        "batch_size": 2,
        "seq_len": 32,
        "eval_batches": 1,
        "eval_every": 0,
        "checkpoint_every": 0,
    },
)
