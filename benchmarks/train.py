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

With ``--lora rank=16,alpha=32,targets=q_proj,k_proj,v_proj,o_proj`` every engine trains that adapter on the
frozen model instead (gemmalab ``train --lora``'s own functions; PEFT's ``get_peft_model``; mlx-lm's
``linear_to_lora_layers`` on the frozen model, as ``mlx_lm.lora`` does), and engine ``torch+q4`` (``+q8``) is
gemmalab's QLoRA, the adapter over int4 (int8, group 64) block linears, compared with gemmalab-torch's LoRA:

    .venv/bin/python benchmarks/train.py --engines torch,transformers,torch+q4 --no-loss-memory \
        --lora rank=16,alpha=32,targets=q_proj,k_proj,v_proj,o_proj --results train-lora.json

Tokens/s = batch x seq / median step time after one warm-up step; peak memory = the process's peak RSS.

Phase profile (``--profile-steps``, torch pair only): after the timed steps, each engine runs more steps of the
same code with wall-clock marks (torch on the CPU is synchronous, so a mark is where the work ends), set by
forward hooks on the backbone, a gradient hook on the final hidden states, and wrappers around the loss, the
optimizer's step and zero_grad (gemmalab: ``Trainer.accumulate`` and ``apply`` themselves, untouched):
backbone forward; head + loss forward (gemmalab's fused loss computes the head's gradient here); head + loss
backward; backbone backward (with the embedding gradient and the tied-weight sum); gradient scaling and
clipping; AdamW; zero_grad; other (numpy -> tensors, loss readout). Each phase also gets its CPU time (user +
sys, all threads) and minor page faults. Beside it: the step's FLOPs (6 x matmul parameters x positions for
the linears, 6 x vocab x hidden x positions for the head, 12 x batch x heads x seq^2 x head_dim per layer for
full-square attention; transformers runs all seq + 1 tokens, so it has 0.8% more) and the machine's fp32
matmul rate (a square 2048 matmul on the same threads, best and median of 8: in the driver before and after
the engines, and in each torch engine's process before and after its steps). "of limit" = the FLOPs at the
best rate of the run / the step time; "of own" = the same at the best rate the engine's own process saw.

On a shared host, ``--rounds N`` runs the engines N times interleaved (a fresh process each) and reports the
median over rounds and each round's ratio, so the spread shows. The date, CPU model and load average go in
the JSON beside the results.

Loss memory (``--loss-memory``): the output head plus cross-entropy, forward and backward, on hidden states
[tokens, 640] against the [262144, 640] head in float32: the naive loss (full logits, then cross-entropy)
against gemmalab's chunked loss, as the extra peak RSS over what the inputs already hold.
Writes benchmarks/results/train.json (``--results`` to change).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
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


class PhaseClock:
    """Marks inside one step: each mark closes the phase named by it (wall clock, CPU time, page faults)."""

    def __init__(self):
        self.marks: list[tuple[str, float, float, int]] = []

    def mark(self, name: str) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.marks.append((name, time.perf_counter(), usage.ru_utime + usage.ru_stime, usage.ru_minflt))

    def phases(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for (_, t0, c0, f0), (name, t1, c1, f1) in itertools.pairwise(self.marks):
            phase = out.setdefault(name, {"s": 0.0, "cpu_s": 0.0, "minor_faults": 0})
            phase["s"] += t1 - t0
            phase["cpu_s"] += c1 - c0
            phase["minor_faults"] += f1 - f0
        return out


PHASES = ["backbone forward", "head+loss forward", "head+loss backward", "backbone backward",
          "grad scale+clip", "AdamW step", "zero_grad", "other"]


def profiled_steps(step, clock: PhaseClock, steps: int) -> list[dict]:
    """``steps`` runs of ``step`` with ``clock`` marking inside; each one's phases and its total."""
    profiles = []
    for _ in range(steps):
        clock.marks.clear()
        clock.mark("start")
        step()
        clock.mark("other")
        phases = clock.phases()
        phases.pop("start", None)
        profiles.append({"step_s": clock.marks[-1][1] - clock.marks[0][1], "phases": phases})
    return profiles


def hook_backbone(backbone, clock: PhaseClock, last_hidden) -> None:
    """Marks at the backbone's start and end, and when the gradient of its output is complete (= the head
    and loss backward is done). ``last_hidden(output)`` picks the final hidden states from the output."""
    backbone.register_forward_pre_hook(lambda *_: clock.mark("other"))

    def after_forward(_module, _args, output):
        clock.mark("backbone forward")
        hidden = last_hidden(output)
        if hidden.requires_grad:
            hidden.register_hook(lambda _grad: clock.mark("head+loss backward"))

    backbone.register_forward_hook(after_forward)


def timed_method(obj, name: str, clock: PhaseClock, before: str | None, after: str) -> None:
    """Replace ``obj.name`` (on this instance) with the same call between two marks."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        if before:
            clock.mark(before)
        result = original(*args, **kwargs)
        clock.mark(after)
        return result

    setattr(obj, name, wrapper)


def run_gemmalab(backend_name: str, folder: str, tokens: np.ndarray, steps: int, profile_steps: int = 0,
                 lora: str | None = None) -> dict:
    from gemmalab import checkpoint
    from gemmalab.backend import get_backend
    from gemmalab.train.spec import OptimizerSpec, TrainSpec

    config = checkpoint.load_config(Path(folder))
    quantize = backend_name.partition("+q")[2]  # "torch+q4": QLoRA over int4 block linears
    backend_name = backend_name.partition("+")[0]
    backend = get_backend(backend_name)
    weights = checkpoint.read_weights(Path(folder), config)
    model = backend.build(config, weights, dtype="float32", device="cpu")
    adapted = []
    if lora:  # the adapter alone trains: gemmalab train --lora's own functions
        from gemmalab.lora import LoraConfig, fresh_adapter, wrap_adapter
        from gemmalab.train.adapter_run import adapter_lr_scales, quantize_base

        settings = LoraConfig.parse(lora)
        if quantize:
            quantize_base(backend, model, config, int(quantize), 64)
        adapted = wrap_adapter(backend, model, config, fresh_adapter(settings, config, 0, weights))
    del weights
    spec = TrainSpec(optimizer=OptimizerSpec(weight_decay=WEIGHT_DECAY), max_grad_norm=MAX_NORM)
    trainer = backend.trainer(model, spec)
    if lora:
        trainer.set_lr_scales(adapter_lr_scales({}, backend.parameter_shapes(model), settings, adapted))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = np.ones(inputs.shape, np.float32)
    losses = []

    def step():
        losses.append(float(trainer.accumulate(inputs, targets, weights) / weights.sum()))
        trainer.apply(LR, float(weights.sum()))

    result = {"step_s": timed_steps(step, steps), "losses": list(losses), "positions": int(inputs.size)}
    if profile_steps and backend_name == "torch":
        result["profile"] = profile_gemmalab_torch(trainer, step, profile_steps)
    return result


def profile_gemmalab_torch(trainer, step, steps: int) -> list[dict]:
    """The trainer's own accumulate and apply, with marks: hooks on the backbone, a wrapper around the
    chunked loss (the function chunked_loss_sum calls), and around the optimizer's step and zero_grad."""
    from gemmalab_torch import training

    clock = PhaseClock()
    hook_backbone(trainer.model.model, clock, lambda output: output.last_hidden_state)
    original_loss = training.chunked_head_loss

    def head_loss(*args, **kwargs):
        loss = original_loss(*args, **kwargs)
        clock.mark("head+loss forward")
        return loss

    training.chunked_head_loss = head_loss  # chunked_loss_sum looks it up in the module at each call
    timed_method(trainer, "accumulate", clock, None, "backbone backward")
    timed_method(trainer.optimizer, "step", clock, "grad scale+clip", "AdamW step")
    timed_method(trainer.optimizer, "zero_grad", clock, None, "zero_grad")
    return profiled_steps(step, clock, steps)


def run_transformers(folder: str, tokens: np.ndarray, steps: int, profile_steps: int = 0,
                     lora: str | None = None) -> dict:
    import torch
    import transformers

    model = transformers.Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if lora:  # PEFT's LoRA, the same settings
        import peft

        from gemmalab.lora import LoraConfig

        settings = LoraConfig.parse(lora)
        model = peft.get_peft_model(model, peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                                                           target_modules=list(settings.targets), lora_dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
    ids = torch.from_numpy(tokens.astype(np.int64))
    losses = []

    clock = None  # a PhaseClock while profiling

    def mark(name: str) -> None:
        if clock is not None:
            clock.mark(name)

    def step():
        loss = model(input_ids=ids, labels=ids).loss  # transformers shifts the labels itself
        mark("head+loss forward")
        loss.backward()
        mark("backbone backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        mark("grad scale+clip")
        optimizer.step()
        mark("AdamW step")
        optimizer.zero_grad(set_to_none=True)
        mark("zero_grad")
        losses.append(float(loss))

    # The model sees all seq + 1 tokens (its loss drops the last position's logits): seq + 1 positions per row.
    result = {"step_s": timed_steps(step, steps), "losses": list(losses), "positions": int(ids.numel())}
    if profile_steps:
        clock = PhaseClock()
        hook_backbone(model.get_base_model().model if lora else model.model, clock,
                      lambda output: output.last_hidden_state)
        result["profile"] = profiled_steps(step, clock, profile_steps)
    return result


def run_mlx_lm(folder: str, tokens: np.ndarray, steps: int, lora: str | None = None) -> dict:
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder))
    if lora:  # mlx_lm.lora's own adapter layers, as its trainer sets them up: the model frozen, then wrapped
        from mlx_lm.tuner.utils import linear_to_lora_layers

        from gemmalab.lora import LoraConfig

        settings = LoraConfig.parse(lora)
        model.freeze()
        keys = [f"self_attn.{k}" if k in ("q_proj", "k_proj", "v_proj", "o_proj") else f"mlp.{k}"
                for k in settings.targets]
        linear_to_lora_layers(model, len(model.layers), {"rank": settings.rank, "scale": settings.scale,
                                                         "dropout": 0.0, "keys": keys})
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

    # default_loss feeds batch[:, :-1] to the model: seq positions per row
    return {"step_s": timed_steps(step, steps), "losses": losses, "positions": int(tokens[:, :-1].size)}


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


def run_matmul(n: int, reps: int = 8) -> dict:
    """fp32 GFLOP/s of a square n x n matmul on this process's threads: best and median of ``reps``."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    flops = 2 * n**3
    return {"n": n, "best_GFLOPs": flops / min(times) / 1e9, "median_GFLOPs": flops / statistics.median(times) / 1e9}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "matmul":
        result = run_matmul(args.matmul_n)
    elif args.worker.startswith("loss-"):
        result = run_loss_memory(args.worker[len("loss-"):], args.tokens)
    else:
        tokens = np.load(args.tokens_file)
        torch_engine = args.worker.partition("+")[0] in ("torch", "transformers")
        matmul_before = run_matmul(args.matmul_n) if torch_engine else None  # the rate beside this engine's steps
        if args.worker == "transformers":
            result = run_transformers(args.checkpoint, tokens, args.steps, args.profile_steps, args.lora)
        elif args.worker == "mlx-lm":
            result = run_mlx_lm(args.checkpoint, tokens, args.steps, args.lora)
        else:
            result = run_gemmalab(args.worker, args.checkpoint, tokens, args.steps, args.profile_steps, args.lora)
        if torch_engine:
            result["matmul"] = [matmul_before, run_matmul(args.matmul_n)]
    from gemmalab.bench import process_peak_rss

    result["peak_rss_bytes"] = process_peak_rss()
    result["rss_after_bytes"] = current_rss()  # what the run holds once loaded (the peak also counts loading)
    print(json.dumps(result))


def current_rss() -> int | None:
    """This process's resident memory now (VmRSS, Linux), or None where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


# --- the driver ---------------------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace, name: str, *extra: str) -> dict:
    print(f"running {name} ...", file=sys.stderr, flush=True)
    return decode.run_worker(__file__, name, args.threads, *extra)


def step_flops(positions: int, batch: int) -> dict:
    """Matmul FLOPs of one fwd + bwd step of the 270M shape on ``positions`` = batch x length tokens."""
    from gemmalab.config import Gemma3Config

    c = Gemma3Config.preset("gemma-3-270m")
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size  # q, o, k, v; MLP
    linear_params = per_layer * c.num_hidden_layers
    length = positions // batch
    # full-square attention (what a masked SDPA kernel computes): QK^T and PV forward, twice that backward
    attention = 12 * batch * c.num_attention_heads * length**2 * c.head_dim * c.num_hidden_layers
    out = {"linears": 6 * linear_params * positions, "head": 6 * c.vocab_size * c.hidden_size * positions,
           "attention": attention, "linear_params": linear_params}
    out["total"] = out["linears"] + out["head"] + out["attention"]
    return out


def median_profile(profiles: list[dict]) -> dict:
    """Per phase, the median over the profiled steps of its seconds, CPU seconds and page faults."""
    out = {"step_s": statistics.median(p["step_s"] for p in profiles), "phases": {}}
    for name in PHASES:
        values = [p["phases"].get(name, {"s": 0.0, "cpu_s": 0.0, "minor_faults": 0}) for p in profiles]
        out["phases"][name] = {key: statistics.median(v[key] for v in values) for key in ("s", "cpu_s", "minor_faults")}
    return out


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "logical_cpus": os.cpu_count(),
            "platform": platform.platform(), "torch": torch.__version__, "load_average_start": os.getloadavg()}


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
    parser.add_argument("--profile-steps", type=int, default=2,
                        help="steps with a per-phase profile after the timed ones (torch pair), 0 = none")
    parser.add_argument("--rounds", type=int, default=1, help="run the engines this many times, interleaved")
    parser.add_argument("--matmul-n", type=int, default=2048, help="size of the square matmul for the fp32 rate")
    parser.add_argument("--lora", default=None, help="train a LoRA adapter instead of every weight, e.g. "
                        "rank=16,alpha=32,targets=q_proj,k_proj,v_proj,o_proj (gemmalab, PEFT and mlx-lm alike); "
                        "engine torch+q4 (or +q8) is gemmalab's QLoRA over int4 (int8) block linears")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    report = {"batch": args.batch, "seq": args.seq, "threads": args.threads, "lora": args.lora, **machine(),
              "rows": [], "ratios": []}
    matmul = [run_worker(args, "matmul", "--matmul-n", str(args.matmul_n))]
    with tempfile.TemporaryDirectory(prefix="gemmalab-train-") as tmp:
        folder = decode.write_checkpoints(Path(tmp), ["float32"], args.seed)["float32"]
        tokens_file = Path(tmp) / "tokens.npy"
        tokens = np.random.default_rng(args.seed).integers(3, 262_144, size=(args.batch, args.seq + 1))
        np.save(tokens_file, tokens.astype(np.int32))
        results: dict[str, list[dict]] = {engine: [] for engine in args.engines.split(",")}
        for _ in range(args.rounds):  # rounds interleave the engines, so a busy spell on a shared host hits both
            for engine in results:
                results[engine].append(run_worker(
                    args, engine, "--checkpoint", str(folder), "--tokens-file", str(tokens_file),
                    "--steps", str(args.steps), "--profile-steps", str(args.profile_steps),
                    *(["--lora", args.lora] if args.lora else [])))
    for engine, runs in results.items():
        by_round = [statistics.median(r["step_s"]) for r in runs]
        step_s = statistics.median(by_round)
        first = runs[0]
        row = {"engine": engine, "step_s": step_s, "step_s_by_round": by_round,
               "step_s_all": [t for r in runs for t in r["step_s"]], "tokens_per_s": args.batch * args.seq / step_s,
               "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs), "losses": first["losses"],
               "rss_after_bytes": first.get("rss_after_bytes")}
        if "positions" in first and not args.lora:  # the FLOP count is full fine-tuning's (weight gradients too)
            row["positions"] = first["positions"]
            row["flops"] = step_flops(first["positions"], args.batch)
        if "matmul" in first:
            row["matmul"] = [m for r in runs for m in r["matmul"]]
            matmul.extend(row["matmul"])
        if first.get("profile"):
            row["profile_steps"] = [p for r in runs for p in r["profile"]]
            row["profile"] = median_profile(row["profile_steps"])
        report["rows"].append(row)
    matmul.append(run_worker(args, "matmul", "--matmul-n", str(args.matmul_n)))
    rate = max(m["best_GFLOPs"] for m in matmul) * 1e9  # the limit: the best this machine did in this run
    report["matmul"] = {"n": args.matmul_n, "runs": matmul, "limit_GFLOPs": rate / 1e9}
    for row in report["rows"]:
        if "flops" in row:
            row["matmul_limit_s"] = row["flops"]["total"] / rate
            row["fraction_of_matmul_limit"] = row["matmul_limit_s"] / row["step_s"]
            if "matmul" in row:  # against the rate this engine's own process saw beside its steps
                own = max(m["best_GFLOPs"] for m in row["matmul"]) * 1e9
                row["fraction_of_own_matmul_rate"] = row["flops"]["total"] / own / row["step_s"]
    report["load_average_end"] = os.getloadavg()
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
    for ours, peer in [*PAIRS, *((q, "torch") for q in ("torch+q4", "torch+q8"))]:
        a, b = by_engine.get(ours), by_engine.get(peer)
        if a and b:
            label = f"gemmalab-{peer}" if peer == "torch" else peer  # QLoRA against gemmalab's own LoRA
            report["ratios"].append({"pair": f"gemmalab-{ours} / {label}", "speed_ratio": a["tokens_per_s"] / b["tokens_per_s"],
                                     "speed_ratio_by_round": [y / x for x, y in zip(a["step_s_by_round"],
                                                                                   b["step_s_by_round"], strict=True)],
                                     "peak_rss_ratio": a["peak_rss_bytes"] / b["peak_rss_bytes"],
                                     "rss_after_ratio": (a["rss_after_bytes"] / b["rss_after_bytes"]
                                                         if a["rss_after_bytes"] and b["rss_after_bytes"] else None),
                                     "first_loss": [a["losses"][0], b["losses"][0]]})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.results).write_text(json.dumps(report, indent=2) + "\n")

    print(f"{'LoRA ' + args.lora if args.lora else 'full fine-tuning'} step, 270M shape, fp32, batch {args.batch} x seq {args.seq}, {args.threads} threads; "
          f"{report['date']}, {report['cpu']}, load average {report['load_average_start'][0]:.1f} -> "
          f"{report['load_average_end'][0]:.1f}")
    print(f"fp32 matmul {args.matmul_n}^2, best / median of 8, GFLOP/s: "
          + ", ".join(f"{m['best_GFLOPs']:.0f}/{m['median_GFLOPs']:.0f}" for m in matmul)
          + f" (driver first and last; each torch engine before and after its steps); limit {rate / 1e9:.1f}")
    print(f"{'engine':<14}{'step s':>9}{'tokens/s':>11}{'peak RSS GB':>13}{'RSS after':>11}{'first loss':>12}"
          f"{'GFLOP':>8}{'limit s':>9}{'of limit':>10}{'of own':>8}")
    for r in report["rows"]:
        after = f"{r['rss_after_bytes'] / 1e9:>11.2f}" if r.get("rss_after_bytes") else f"{'-':>11}"
        line = (f"{r['engine']:<14}{r['step_s']:>9.2f}{r['tokens_per_s']:>11.1f}{r['peak_rss_bytes'] / 1e9:>13.2f}"
                f"{after}{r['losses'][0]:>12.4f}")
        if "flops" in r:
            line += f"{r['flops']['total'] / 1e9:>8.1f}{r['matmul_limit_s']:>9.2f}{r['fraction_of_matmul_limit']:>10.0%}"
            if "fraction_of_own_matmul_rate" in r:
                line += f"{r['fraction_of_own_matmul_rate']:>8.0%}"
        print(line)
    profiled = [r for r in report["rows"] if "profile" in r]
    if profiled:
        print(f"per-phase profile, median of {args.profile_steps} x {args.rounds} steps: wall s (share of the step) and CPU s")
        print(f"{'phase':<20}" + "".join(f"{r['engine']:>26}" for r in profiled))
        for name in PHASES:
            cells = []
            for r in profiled:
                p = r["profile"]["phases"][name]
                cells.append(f"{p['s']:>8.2f} ({p['s'] / r['profile']['step_s']:>4.0%}) cpu {p['cpu_s']:>5.2f}")
            print(f"{name:<20}" + "".join(f"{c:>26}" for c in cells))
        print(f"{'profiled step':<20}" + "".join(f"{r['profile']['step_s']:>16.2f}{'':>10}" for r in profiled))
        print(f"{'minor page faults':<20}" + "".join(
            f"{sum(p['minor_faults'] for p in r['profile']['phases'].values()):>16,.0f}{'':>10}" for r in profiled))
    for r in report["ratios"]:
        rounds = ", ".join(f"x{x:.2f}" for x in r["speed_ratio_by_round"])
        after = f", RSS after the steps x{r['rss_after_ratio']:.2f}" if r.get("rss_after_ratio") else ""
        print(f"{r['pair']:<32} speed x{r['speed_ratio']:.2f} (by round: {rounds})  peak RSS x{r['peak_rss_ratio']:.2f}"
              f"{after}")
    m = report.get("loss_memory")
    if m:
        print(f"loss memory at vocab 262144, {m['tokens']} positions: naive {m['naive_extra_peak_bytes'] / 1e9:.2f} GB, "
              f"chunked {m['chunked_extra_peak_bytes'] / 1e9:.2f} GB (x{m['ratio']:.2f}), same loss: {m['same_loss']}")


if __name__ == "__main__":
    main()
