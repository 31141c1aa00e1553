"""quantize-tiny: what int8 and int4 weights cost in accuracy and give in decode speed. A `tiny` model is trained
on the embedded corpus; the experiment then loads it four ways, fp32, bf16, q8 and q4 (the block linears
quantized blockwise over the bf16 model, gemmalab.quantize's numbers, each backend's kernels: README,
Quantized linears), and measures on each, in one run, the held-out perplexity (the training run's own
held-out windows) and greedy decode tokens/s.

    gemmalab experiments run quantize-tiny [--out DIR] [--set quantize.group_size=32] [--set backend=mlx]

The embedding (the tied head) stays in the model's dtype: a quantized head is not built yet (issue 14).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gemmalab
from gemmalab.backend import resolve_backend_name
from gemmalab.experiments import Experiment
from gemmalab.experiments.progress import step_reporter
from gemmalab.linears import select
from gemmalab.train import TrainConfig, train
from gemmalab.train.evaluation import perplexity, plan_eval

SECTIONS = ("model", "quantize", "decode")
VARIANTS = (("fp32", "float32", None), ("bf16", "bfloat16", None), ("q8", "bfloat16", 8), ("q4", "bfloat16", 4))


def variant(checkpoint: Path, backend: str, dtype: str, bits: int | None, group_size: int):
    model = gemmalab.load(checkpoint, backend=backend, dtype=dtype)
    if bits is not None:
        model.wrap("quantized", select(model.config, layers=range(model.config.num_hidden_layers)), bits=bits,
                   group_size=group_size)
    return model


def decode_speed(model, prompt: list[int], tokens: int, repeats: int) -> dict[str, float]:
    """Greedy decode tokens/s, the best of ``repeats`` timed calls after one warm-up call (compilation)."""
    model.generate(prompt, tokens, temperature=0.0)
    best = None
    for _ in range(repeats):
        stats = model.generate(prompt, tokens, temperature=0.0).stats
        if best is None or stats.generation_tokens_per_second > best.generation_tokens_per_second:
            best = stats
    return {"decode_tokens_per_s": best.generation_tokens_per_second, "generated_tokens": best.generated_tokens}


def run(settings: dict[str, Any], out: Path, progress, log) -> dict[str, Any]:
    common = {k: v for k, v in settings.items() if k not in SECTIONS}
    config = TrainConfig.from_dict({**common, **settings["model"], "out": str(out / "model")})
    backend = resolve_backend_name(config.backend)
    log(f"1/2: training the model ({config.preset}, {config.steps} steps on the embedded corpus, {backend})")
    checkpoint = train(config, progress=False, echo=log, on_step=step_reporter(progress, "train", config.steps)).checkpoint

    group, decode = settings["quantize"]["group_size"], settings["decode"]
    plan = plan_eval(checkpoint)
    prompt = list(range(10, 10 + decode["prompt_tokens"]))
    rows = []
    log(f"2/2: perplexity and decode speed of {', '.join(name for name, _, _ in VARIANTS)} (group size {group})")
    for index, (name, dtype, bits) in enumerate(VARIANTS):
        progress("variants", index, len(VARIANTS), name)
        model = variant(checkpoint, backend, dtype, bits, group)
        scored = perplexity(model, plan=plan)
        rows.append({"variant": name, "dtype": dtype, "bits": bits, "perplexity": scored.perplexity,
                     "loss": scored.loss, **decode_speed(model, prompt, decode["tokens"], decode["repeats"])})
        log(f"{name}: perplexity {scored.perplexity:.4f}, decode {rows[-1]['decode_tokens_per_s']:.0f} tokens/s")
    progress("variants", len(VARIANTS), len(VARIANTS), "done")
    by_name = {row["variant"]: row for row in rows}
    plot = bar_plot(out / "quantize.png", rows, f"quantize-tiny ({backend}, group size {group})")
    return {
        **{f"perplexity_{row['variant']}": row["perplexity"] for row in rows},
        **{f"decode_tokens_per_s_{row['variant']}": row["decode_tokens_per_s"] for row in rows},
        "perplexity_increase_q8": by_name["q8"]["perplexity"] / by_name["fp32"]["perplexity"] - 1,
        "perplexity_increase_q4": by_name["q4"]["perplexity"] / by_name["fp32"]["perplexity"] - 1,
        "table": rows,
        "group_size": group,
        "backend": backend,
        "checkpoint": str(checkpoint),
        "plot": plot.name,
    }


def bar_plot(path: Path, rows: list[dict[str, Any]], title: str) -> Path:
    """Perplexity and decode tokens/s of each variant, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [row["variant"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.6), dpi=110)
    try:
        left.bar(names, [row["perplexity"] for row in rows], color="#4c72b0")
        left.set_title("held-out perplexity")
        low = min(row["perplexity"] for row in rows)
        left.set_ylim(low * 0.98, max(row["perplexity"] for row in rows) * 1.01)
        right.bar(names, [row["decode_tokens_per_s"] for row in rows], color="#dd8452")
        right.set_title("greedy decode tokens/s")
        figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(path)
    finally:
        plt.close(figure)
    return path


EXPERIMENT = Experiment(
    name="quantize-tiny",
    summary="A trained tiny model in fp32, bf16, q8 and q4: held-out perplexity and decode speed in one table.",
    config="configs/quantize-tiny.yaml",
    expected="about 1 minute on PyTorch (2 CPU cores)",
    run=run,
    headline=("perplexity_fp32", "perplexity_bf16", "perplexity_q8", "perplexity_q4", "decode_tokens_per_s_fp32",
              "decode_tokens_per_s_q4", "backend"),
    smoke={"model.steps": 4, "batch_size": 2, "seq_len": 64, "eval_batches": 1, "decode.tokens": 8,
           "decode.repeats": 1, "decode.prompt_tokens": 4},
)
