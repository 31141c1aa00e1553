"""Full fine-tuning speed and memory, gemmalab beside its peer, in one run: ratios, not absolute claims.

    .venv/bin/python benchmarks/train.py --engines torch,transformers                  # -> results/train.json
    .venv/bin/python benchmarks/train.py --engines mlx,mlx-lm --batch 1 --seq 64 --no-loss-memory \
        --results train-mlx.json        # MLX's Linux CPU build is ~25x slower at fp32 matmuls: a smaller batch

Pairs, each engine in a fresh process on the same random checkpoint of the exact Gemma 3 270M shape
(vocab 262144), float32, the same batch of random tokens, AdamW (lr 1e-5, weight decay 0.01) with
global-norm clipping at 1.0, 2 threads:

* gemmalab-torch vs a plain transformers ``Gemma3ForCausalLM`` + ``torch.optim.AdamW`` loop
  (``model(input_ids, labels=...)``, ``loss.backward()``, ``clip_grad_norm_``, ``step``);
* gemmalab-mlx vs mlx-lm's own training step, the one ``mlx_lm.lora --fine-tune-type full`` runs
  (``mlx_lm.tuner.trainer.default_loss`` under ``nn.value_and_grad``, compiled with the model and optimizer
  state as ``mlx_lm.tuner.trainer.train`` does, ``optim.AdamW`` with bias correction as gemmalab's).

Tokens/s = batch x seq / median step time after one warm-up step; peak memory = the process's peak RSS.

Loss memory (``--loss-memory``): the output head plus cross-entropy, forward and backward, on hidden states
[tokens, 640] against the [262144, 640] head in float32: the naive loss (full logits, then cross-entropy)
against gemmalab's chunked loss, as the extra peak RSS over what the inputs already hold.
Writes benchmarks/results/train.json (``--results`` to change).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import decode  # the same random 270M-shaped checkpoint and worker processes as the decode benchmark
import numpy as np

RESULTS = Path(__file__).parent / "results"
PAIRS = [("torch", "transformers"), ("mlx", "mlx-lm")]
LR, WEIGHT_DECAY, MAX_NORM = 1e-5, 0.01, 1.0


# --- workers: each runs in its own process ------------------------------------------------------------------
def timed_steps(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps + 1):  # the first is warm-up (allocation, compilation)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times[1:]


def run_gemmalab(backend_name: str, folder: str, tokens: np.ndarray, steps: int) -> dict:
    from gemmalab import checkpoint
    from gemmalab.backend import get_backend
    from gemmalab.train.spec import OptimizerSpec, TrainSpec

    config = checkpoint.load_config(Path(folder))
    backend = get_backend(backend_name)
    model = backend.build(config, checkpoint.read_weights(Path(folder), config), dtype="float32", device="cpu")
    spec = TrainSpec(optimizer=OptimizerSpec(weight_decay=WEIGHT_DECAY), max_grad_norm=MAX_NORM)
    trainer = backend.trainer(model, spec)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = np.ones(inputs.shape, np.float32)
    losses = []

    def step():
        losses.append(float(trainer.accumulate(inputs, targets, weights) / weights.sum()))
        trainer.apply(LR, float(weights.sum()))

    return {"step_s": timed_steps(step, steps), "losses": losses}


def run_transformers(folder: str, tokens: np.ndarray, steps: int) -> dict:
    import torch
    import transformers

    model = transformers.Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    ids = torch.from_numpy(tokens.astype(np.int64))
    losses = []

    def step():
        loss = model(input_ids=ids, labels=ids).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))

    return {"step_s": timed_steps(step, steps), "losses": losses}


def run_mlx_lm(folder: str, tokens: np.ndarray, steps: int) -> dict:
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder))
    model.train()
    # With bias correction, as gemmalab's AdamW (MLX's default leaves it out): the same optimizer, so the
    # two engines' losses must agree step by step; the speed is the same either way.
    optimizer = optim.AdamW(learning_rate=LR, weight_decay=WEIGHT_DECAY, bias_correction=True)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled_step(batch, lengths):
        (loss, _), grad = loss_value_and_grad(model, batch, lengths)
        grad, _ = optim.clip_grad_norm(grad, MAX_NORM)
        optimizer.update(model, grad)
        return loss

    batch = mx.array(tokens)
    lengths = mx.array([[0, tokens.shape[1]]] * tokens.shape[0])  # every position is trained
    losses = []

    def step():
        loss = compiled_step(batch, lengths)
        mx.eval(state, loss)
        losses.append(float(loss))

    return {"step_s": timed_steps(step, steps), "losses": losses}


def run_loss_memory(kind: str, tokens: int) -> dict:
    """Extra peak RSS of head + loss, forward and backward, over the inputs' own memory (torch, fp32)."""
    import torch
    import torch.nn.functional as F
    from gemmalab_torch.training import chunked_head_loss

    from gemmalab.bench import process_peak_rss, reset_process_peak_rss
    from gemmalab.train.losses import CrossEntropy
    from gemmalab.train.spec import LOSS_CHUNK_TOKENS

    gen = torch.Generator().manual_seed(0)
    head = (torch.randn(262_144, 640, generator=gen) * 0.02).requires_grad_()
    hidden = torch.randn(tokens, 640, generator=gen).requires_grad_()
    targets = torch.randint(0, 262_144, (tokens,), generator=gen)
    weights = torch.ones(tokens)
    head.grad = torch.zeros_like(head)  # the gradient buffers exist in both cases: not the loss's memory
    hidden.grad = torch.zeros_like(hidden)
    reset_process_peak_rss()
    baseline = process_peak_rss()
    if kind == "naive":
        loss = F.cross_entropy(hidden @ head.T, targets, reduction="sum")
    else:
        loss = chunked_head_loss(head, hidden, targets, weights, terms=(CrossEntropy(),),
                                 chunk_tokens=LOSS_CHUNK_TOKENS)
    loss.backward()
    return {"loss_extra_peak_bytes": process_peak_rss() - baseline, "loss": float(loss)}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.worker.startswith("loss-"):
        result = run_loss_memory(args.worker[len("loss-"):], args.tokens)
    else:
        tokens = np.load(args.tokens_file)
        if args.worker == "transformers":
            result = run_transformers(args.checkpoint, tokens, args.steps)
        elif args.worker == "mlx-lm":
            result = run_mlx_lm(args.checkpoint, tokens, args.steps)
        else:
            result = run_gemmalab(args.worker, args.checkpoint, tokens, args.steps)
    from gemmalab.bench import process_peak_rss

    result["peak_rss_bytes"] = process_peak_rss()
    print(json.dumps(result))


# --- the driver ---------------------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace, name: str, *extra: str) -> dict:
    print(f"running {name} ...", file=sys.stderr, flush=True)
    return decode.run_worker(__file__, name, args.threads, *extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--tokens-file", help=argparse.SUPPRESS)
    parser.add_argument("--engines", default="torch,transformers,mlx,mlx-lm")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--tokens", type=int, default=4096, help="positions in the loss-memory check")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="train.json", help="file name under benchmarks/results/")
    parser.add_argument("--no-loss-memory", action="store_true", help="skip the loss-memory check")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    report = {"batch": args.batch, "seq": args.seq, "threads": args.threads, "rows": [], "ratios": []}
    with tempfile.TemporaryDirectory(prefix="gemmalab-train-") as tmp:
        folder = decode.write_checkpoints(Path(tmp), ["float32"], args.seed)["float32"]
        tokens_file = Path(tmp) / "tokens.npy"
        tokens = np.random.default_rng(args.seed).integers(3, 262_144, size=(args.batch, args.seq + 1))
        np.save(tokens_file, tokens.astype(np.int32))
        for engine in args.engines.split(","):
            result = run_worker(args, engine, "--checkpoint", str(folder), "--tokens-file", str(tokens_file),
                                "--steps", str(args.steps))
            step_s = statistics.median(result["step_s"])
            report["rows"].append({"engine": engine, "step_s": step_s, "tokens_per_s": args.batch * args.seq / step_s,
                                   "peak_rss_bytes": result["peak_rss_bytes"], "losses": result["losses"]})
    if not args.no_loss_memory:
        loss_memory = {kind: run_worker(args, f"loss-{kind}", "--tokens", str(args.tokens))
                       for kind in ("naive", "chunked")}
        report["loss_memory"] = {
            "tokens": args.tokens, "vocab": 262_144,
            **{f"{kind}_extra_peak_bytes": r["loss_extra_peak_bytes"] for kind, r in loss_memory.items()},
            "ratio": loss_memory["chunked"]["loss_extra_peak_bytes"] / loss_memory["naive"]["loss_extra_peak_bytes"],
            "same_loss": abs(loss_memory["chunked"]["loss"] / loss_memory["naive"]["loss"] - 1) < 1e-5,
        }
    by_engine = {r["engine"]: r for r in report["rows"]}
    for ours, peer in PAIRS:
        a, b = by_engine.get(ours), by_engine.get(peer)
        if a and b:
            report["ratios"].append({"pair": f"gemmalab-{ours} / {peer}", "speed_ratio": a["tokens_per_s"] / b["tokens_per_s"],
                                     "peak_rss_ratio": a["peak_rss_bytes"] / b["peak_rss_bytes"],
                                     "first_loss": [a["losses"][0], b["losses"][0]]})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.results).write_text(json.dumps(report, indent=2) + "\n")

    print(f"full fine-tuning step, 270M shape, fp32, batch {args.batch} x seq {args.seq}, {args.threads} threads")
    print(f"{'engine':<14}{'step s':>9}{'tokens/s':>11}{'peak RSS GB':>13}{'first loss':>12}")
    for r in report["rows"]:
        print(f"{r['engine']:<14}{r['step_s']:>9.2f}{r['tokens_per_s']:>11.1f}{r['peak_rss_bytes'] / 1e9:>13.2f}"
              f"{r['losses'][0]:>12.4f}")
    for r in report["ratios"]:
        print(f"{r['pair']:<32} speed x{r['speed_ratio']:.2f}  peak RSS x{r['peak_rss_ratio']:.2f}")
    m = report.get("loss_memory")
    if m:
        print(f"loss memory at vocab 262144, {m['tokens']} positions: naive {m['naive_extra_peak_bytes'] / 1e9:.2f} GB, "
              f"chunked {m['chunked_extra_peak_bytes'] / 1e9:.2f} GB (x{m['ratio']:.2f}), same loss: {m['same_loss']}")


if __name__ == "__main__":
    main()
