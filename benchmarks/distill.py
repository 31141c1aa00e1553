"""Knowledge-distillation speed and memory, gemmalab beside its peer, in one run: ratios, not absolute claims.

    .venv/bin/python benchmarks/distill.py                                      # -> results/distill.json
    .venv/bin/python benchmarks/distill.py --engines mlx,mlx-lm --batch 1 --seq 64 --no-loss-memory \
        --results distill-mlx.json      # MLX's Linux CPU build is ~25x slower at fp32 matmuls: a smaller batch
    .venv/bin/python benchmarks/distill.py --engines torch,torch+features --no-loss-memory \
        --results distill-features.json  # the cost of hidden-state and attention transfer on the same step
    .venv/bin/python benchmarks/distill.py --student-preset tiny --teacher-preset tiny-mqa --vocab 4096 \
        --engines torch,transformers,mlx,mlx-lm --positions 512,2048 --loss-vocab 32768 \
        --results distill-smoke.json                     # the smoke run: tiny shapes, about a minute

The loss everywhere: ``alpha * CE + (1 - alpha) * T^2 * KL(p_teacher || p_student)`` at alpha = 0.5, T = 2 (forward
KL, gemmalab.train.losses.distillation_loss(alpha=0.5, temperature=2.0)), float32, mean over positions.

KD step (the default part): one whole distillation step -- the frozen teacher's forward, the student's forward and
backward, global-norm clipping at 1.0, AdamW (lr 1e-5, weight decay 0.01, bias-corrected) -- on a batch of
``--batch`` x ``--seq`` random tokens (inputs = tokens[:, :-1], targets = tokens[:, 1:]). The student has the exact
shape of ``--student-preset`` (gemma-3-270m), the teacher that of ``--teacher-preset`` (gemma-3-1b); the student
takes the teacher's vocabulary (as a preset student of ``gemmalab distill`` does; ``--vocab N`` gives both N ids).
Two random checkpoints (seeds ``--seed`` and ``--seed + 1``) are written once in HF format, float32; every engine
loads the same two, in a fresh process (so its peak RSS is its own), on ``--threads`` threads. Pairs:

* gemmalab-torch: ``gemmalab distill``'s machinery -- ``backend.trainer(student, TrainSpec(loss=distillation_loss(
  0.5, 2.0)), companions={"teacher": teacher})``, then per step ``accumulate(inputs, targets, weights)`` and
  ``apply(lr, weights.sum())``: the teacher's backbone once under no_grad, both output heads and the loss chunk by
  chunk (512 positions), so neither model's [positions, vocab] logits exist;
* vs a plain PyTorch loop on transformers ``Gemma3ForCausalLM`` student and teacher: the teacher under
  ``torch.no_grad()``, both models' full logits, ``F.kl_div(log_softmax(s / T), log_softmax(t / T),
  log_target=True, reduction="batchmean") * T^2`` plus ``F.cross_entropy``, ``loss.backward()``,
  ``clip_grad_norm_``, ``torch.optim.AdamW.step()``, ``zero_grad`` (``use_cache=False`` in both forwards);
* gemmalab-mlx (the same trainer calls on the MLX backend) vs the same loop written with mlx-lm's models
  (``mlx_lm.utils.load_model``: ``mlx_lm.models.gemma3_text.Model``): ``mx.stop_gradient`` of the teacher's
  logits, ``nn.log_softmax``, ``nn.losses.kl_div_loss`` and ``nn.losses.cross_entropy`` under
  ``nn.value_and_grad``, ``optim.clip_grad_norm``, ``optim.AdamW(bias_correction=True)``, the whole step compiled
  with the model, teacher and optimizer state as benchmarks/train.py compiles mlx-lm's own step. mlx-lm's
  gemma3_text scales the embeddings by sqrt(hidden) rounded to bfloat16 (25.25 for sqrt(640) = 25.298), gemmalab
  and transformers by the exact float32 value, so that pair's first losses differ by ~3e-5 at the 270M shape;
  the mlx-lm worker also computes, once and untimed, the same loss with the exact scale (embeddings pre-multiplied
  through the model's ``input_embeddings``), which agrees with gemmalab-mlx's to float32 rounding.

Feature transfer (``--engines torch,torch+features``, also ``mlx+features`` and ``jax+features``): the same
gemmalab step with, beside the logits' loss, ``gemmalab distill``'s hidden-state transfer (cosine, through a
learned 640 -> 1152 projection per pair) and attention-map transfer (KL of attention rows, ``--attention-chunk``
query rows at a time) on every student block, uniformly mapped onto the teacher's (``hidden_weight`` and
``attention_weight`` 1, the terms of gemmalab.distill.config.transfer_terms). Its row against the plain row of
the same backend gives the cost: ``feature_costs`` in the JSON, step time and peak RSS ratios.

Step time = the median after one warm-up step; tokens/s = batch x seq / step time; peak memory = the worker
process's peak RSS (VmHWM, gemmalab.bench.process_peak_rss). Each engine records the loss of every step and its
two components, so the first step's losses of a pair (same models, same batch, same formula) show the comparison
is like for like: they agree to float32 rounding (~1e-7 relative for the loss; the KD component, small for random
models and a difference of nearly equal sums, to ~1e-5). Beside them: the step's matmul FLOPs (student
6 x, teacher 2 x (matmul parameters x positions + vocab x hidden x positions) + full-square attention) against
the machine's fp32 matmul rate (a square 2048 matmul on the same threads, best and median of 8: in the driver
before and after the engines, and in each torch engine's process before and after its steps).

KD loss memory (``--loss-memory``, the default; torch): the loss alone, forward and backward, on given final hidden
states -- student [positions, 640] against its [vocab, 640] head (trainable: its gradient and the hidden states'
are computed), teacher [positions, 1152] against its [vocab, 1152] head (frozen), vocab ``--loss-vocab`` (262144),
reduction sum. gemmalab: ``gemmalab_torch.training.chunked_head_loss`` with the terms of ``distillation_loss(0.5,
2.0)`` and a ``CompanionHead`` for the teacher, 512 positions a chunk. Naive: the full student and teacher
logits, ``log_softmax`` of both at T, ``F.kl_div(..., log_target=True)`` + ``F.cross_entropy``, backward. Each
measurement runs in a fresh process and reports the extra peak RSS over what the inputs already hold (the
inputs, and zeroed gradient buffers of the student's head and hidden states, are allocated before the peak is
reset). The naive loss holds about 8 [positions, vocab] float32 arrays (4.3 GB each at 4096 x 262144), ~35 GB:
before launching one, the driver compares that estimate with /proc/meminfo's MemAvailable less a reserve
(``--memory-reserve-gb``) and skips it with a printed reason when it does not fit; the worker also caps its own
address space at the same budget (RLIMIT_AS), so a wrong estimate fails the measurement, not the machine. When
the naive loss does not fit at the largest of ``--positions``, both losses are also measured at the two largest
halvings that fit (e.g. 2048 and 1024), and the output says so; the ratio is reported at every positions where
both ran, and the naive loss's extra memory at the positions it skipped is extrapolated (a least-squares line
through its measurements), marked as an estimate. This part runs first, while the driver holds little memory.

The date, CPU model, load average and the fp32 matmul rate go in the JSON beside the results. Writes
benchmarks/results/distill.json (``--results`` to change). Memory the default run needs: each step engine holds
the student with its gradients and AdamW state (4.3 GB) and the 1B teacher (4 GB) plus activations, ~12 GB; the
naive loss at 2048 positions ~20 GB (at 4096 ~38 GB: it is skipped on a 24 GB machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import decode  # run_worker: each engine in a fresh process limited to N threads
import numpy as np
import train  # timed_steps, run_matmul, machine, the optimizer settings: the same as the fine-tuning benchmark

RESULTS = Path(__file__).parent / "results"
PAIRS = [("torch", "transformers"), ("mlx", "mlx-lm")]
FEATURES = "+features"  # an engine suffix: the same gemmalab step with hidden-state and attention transfer
LR, WEIGHT_DECAY, MAX_NORM = train.LR, train.WEIGHT_DECAY, train.MAX_NORM
ALPHA, TEMPERATURE = 0.5, 2.0
TEACHER = "teacher"
# The loss-memory shapes: the hidden sizes of gemma-3-270m (student) and gemma-3-1b (teacher).
STUDENT_DIM, TEACHER_DIM = 640, 1152
# [positions, vocab] float32 arrays the naive loss holds at its peak, for the driver's estimate before it launches
# one: measured 8.0 per position (+ 60 MB) at 256 and 512 positions x 262144 on torch 2.13 CPU (both logits, the
# three log-softmaxes, what kl_div saves, then the backward's gradients), a little over: if it is still short, the
# worker's address-space cap stops the measurement, not the machine.
NAIVE_COPIES = 8.2
# gemmalab's chunked loss: measured 4.5 GB extra at one chunk of 512 x 262144 (8.4 [chunk, vocab] arrays' worth),
# of which the head's [vocab, 640] gradient and its scaled copy in the backward are 1.3 GB; a little over.
CHUNKED_CHUNK_COPIES, CHUNKED_HEAD_COPIES = 7.0, 2.5
PROCESS_OVERHEAD = 1 << 29  # python + torch + its thread pools, beyond the inputs (measured: 0.26 GB)


# --- workers: each runs in its own process ------------------------------------------------------------------
def kd_formula_torch(student_logits, teacher_logits, targets):
    """(loss, ce, kd) of the plain loop: full logits [n, vocab] of both models, means over the n positions."""
    import torch.nn.functional as F

    shared = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_s = F.log_softmax(student_logits[:, :shared] / TEMPERATURE, dim=-1)
    log_t = F.log_softmax(teacher_logits[:, :shared] / TEMPERATURE, dim=-1)
    kd = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * TEMPERATURE**2
    ce = F.cross_entropy(student_logits, targets)
    return ALPHA * ce + (1 - ALPHA) * kd, ce, kd


def feature_loss(student_folder: str, teacher_folder: str, attention_chunk: int):
    """The logits' loss plus gemmalab distill's hidden-state and attention transfer on the uniform mapping."""
    from dataclasses import replace

    from gemmalab import checkpoint
    from gemmalab.distill.config import DistillConfig, transfer_terms
    from gemmalab.train.losses import distillation_loss

    config = DistillConfig(teacher=teacher_folder, hidden_weight=1.0, attention_weight=1.0,
                           attention_chunk=attention_chunk, mapping="uniform")
    terms = transfer_terms(config, checkpoint.load_config(Path(student_folder)), checkpoint.load_config(Path(teacher_folder)))
    return replace(distillation_loss(alpha=ALPHA, temperature=TEMPERATURE, teacher=TEACHER), transfer=terms)


def run_gemmalab(engine: str, student_folder: str, teacher_folder: str, tokens: np.ndarray, steps: int,
                 attention_chunk: int = 128) -> dict:
    from gemmalab import checkpoint
    from gemmalab.backend import get_backend
    from gemmalab.train.losses import distillation_loss
    from gemmalab.train.spec import OptimizerSpec, TrainSpec

    backend = get_backend(engine.removesuffix(FEATURES))

    def build(folder: str):
        config = checkpoint.load_config(Path(folder))
        return backend.build(config, checkpoint.read_weights(Path(folder), config), dtype="float32", device="cpu")

    student, teacher = build(student_folder), build(teacher_folder)
    loss = feature_loss(student_folder, teacher_folder, attention_chunk) if engine.endswith(FEATURES) else \
        distillation_loss(alpha=ALPHA, temperature=TEMPERATURE, teacher=TEACHER)
    spec = TrainSpec(optimizer=OptimizerSpec(weight_decay=WEIGHT_DECAY), max_grad_norm=MAX_NORM, loss=loss)
    trainer = backend.trainer(student, spec, companions={TEACHER: teacher})
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = np.ones(inputs.shape, np.float32)
    tokens_count = float(weights.sum())
    losses, ce, kd = [], [], []

    def step():
        losses.append(trainer.accumulate(inputs, targets, weights) / tokens_count)
        sums = trainer.term_sums()
        ce.append(sums["cross_entropy"] / tokens_count)
        kd.append(sums["distillation"] / tokens_count)
        trainer.apply(LR, tokens_count)

    return {"step_s": train.timed_steps(step, steps), "losses": losses, "ce": ce, "kd": kd}


def run_transformers(student_folder: str, teacher_folder: str, tokens: np.ndarray, steps: int) -> dict:
    import torch
    import transformers

    student = transformers.Gemma3ForCausalLM.from_pretrained(student_folder, dtype=torch.float32)
    teacher = transformers.Gemma3ForCausalLM.from_pretrained(teacher_folder, dtype=torch.float32)
    student.train()
    teacher.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    ids = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    targets = torch.from_numpy(tokens[:, 1:].astype(np.int64)).reshape(-1)
    losses, ce, kd = [], [], []

    def step():
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        student_logits = student(input_ids=ids, use_cache=False).logits
        loss, ce_loss, kd_loss = kd_formula_torch(student_logits.flatten(0, 1), teacher_logits.flatten(0, 1), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        ce.append(float(ce_loss))
        kd.append(float(kd_loss))

    return {"step_s": train.timed_steps(step, steps), "losses": losses, "ce": ce, "kd": kd}


def run_mlx_lm(student_folder: str, teacher_folder: str, tokens: np.ndarray, steps: int) -> dict:
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.utils import load_model

    student, _ = load_model(Path(student_folder))
    teacher, _ = load_model(Path(teacher_folder))
    student.train()
    teacher.eval()
    teacher.freeze()
    # With bias correction, as gemmalab's AdamW (MLX's default leaves it out), as benchmarks/train.py does.
    optimizer = optim.AdamW(learning_rate=LR, weight_decay=WEIGHT_DECAY, bias_correction=True)

    def kd_terms(logits, targets, teacher_logits):
        shared = min(logits.shape[-1], teacher_logits.shape[-1])
        log_s = nn.log_softmax(logits[..., :shared] / TEMPERATURE, axis=-1)
        log_t = nn.log_softmax(teacher_logits[..., :shared] / TEMPERATURE, axis=-1)
        kd = nn.losses.kl_div_loss(log_s, log_t, axis=-1, reduction="mean") * TEMPERATURE**2
        ce = nn.losses.cross_entropy(logits, targets, reduction="mean")
        return ALPHA * ce + (1 - ALPHA) * kd, (ce, kd)

    def kd_loss(model, inputs, targets, teacher_logits):
        return kd_terms(model(inputs).astype(mx.float32), targets, teacher_logits)

    loss_value_and_grad = nn.value_and_grad(student, kd_loss)
    state = [student.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=[*state, teacher.state], outputs=state)
    def compiled_step(inputs, targets):
        teacher_logits = mx.stop_gradient(teacher(inputs).astype(mx.float32))
        (loss, parts), grad = loss_value_and_grad(student, inputs, targets, teacher_logits)
        grad, _ = optim.clip_grad_norm(grad, MAX_NORM)
        optimizer.update(student, grad)
        return loss, parts

    inputs, targets = mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:])

    # mlx-lm's gemma3_text multiplies the embeddings by sqrt(hidden) rounded to bfloat16 (25.25 for 25.298 at
    # 640), transformers and gemmalab by sqrt(hidden) in the weights' dtype: the models differ by that, so the
    # first losses of the pair differ by ~1e-5. Once, before the steps (untimed): the same loss with the exact
    # scale (the embeddings pre-multiplied by exact / rounded, through the model's input_embeddings), which
    # must agree with gemmalab's step-1 loss to float32 rounding, as the torch pair's does.
    def exact_scale_logits(model):
        exact = model.args.hidden_size**0.5
        rounded = mx.array(exact, mx.bfloat16).astype(mx.float32).item()
        embeddings = model.model.embed_tokens(inputs) * (exact / rounded)
        return model(inputs, input_embeddings=embeddings).astype(mx.float32)

    check, (check_ce, check_kd) = kd_terms(exact_scale_logits(student), targets, exact_scale_logits(teacher))
    mx.eval(check, check_ce, check_kd)
    exact_scale = {"loss": check.item(), "ce": check_ce.item(), "kd": check_kd.item()}
    losses, ce, kd = [], [], []

    def step():
        loss, (ce_loss, kd_loss) = compiled_step(inputs, targets)
        mx.eval(state, loss, ce_loss, kd_loss)
        losses.append(float(loss))
        ce.append(float(ce_loss))
        kd.append(float(kd_loss))

    return {"step_s": train.timed_steps(step, steps), "losses": losses, "ce": ce, "kd": kd,
            "first_exact_embed_scale": exact_scale}


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (what can be allocated without swapping or the OOM killer)."""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def vm_size() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def run_loss_memory(kind: str, positions: int, vocab: int, budget: int) -> dict:
    """Extra peak RSS of the KD loss, forward and backward, over what the inputs hold (torch, fp32). The
    process caps its address space at ``budget`` bytes beyond what it maps before it allocates the inputs, so
    when the estimate it was launched on is short, an allocation fails here (reported as skipped) instead of
    the machine running out of memory."""
    import torch
    import torch.nn.functional as F
    from gemmalab_torch.training import CompanionHead, chunked_head_loss

    from gemmalab.bench import process_peak_rss, reset_process_peak_rss
    from gemmalab.train.losses import distillation_loss
    from gemmalab.train.spec import LOSS_CHUNK_TOKENS

    torch.randn(64, 64) @ torch.randn(64, 64)  # start the thread pool (its stacks and arenas) before the cap
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + budget, resource.getrlimit(resource.RLIMIT_AS)[1]))
    baseline = None
    try:
        gen = torch.Generator().manual_seed(0)
        student_head = (torch.randn(vocab, STUDENT_DIM, generator=gen) * 0.02).requires_grad_()
        teacher_head = torch.randn(vocab, TEACHER_DIM, generator=gen) * 0.02  # frozen: no gradient
        student_hidden = torch.randn(positions, STUDENT_DIM, generator=gen).requires_grad_()
        teacher_hidden = torch.randn(positions, TEACHER_DIM, generator=gen)
        targets = torch.randint(0, vocab, (positions,), generator=gen)
        weights = torch.ones(positions)
        student_head.grad = torch.zeros_like(student_head)  # the gradient buffers exist in both cases
        student_hidden.grad = torch.zeros_like(student_hidden)
        reset_process_peak_rss()
        baseline = process_peak_rss()
        if kind == "naive":
            student_logits = student_hidden @ student_head.T
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_head.T
            log_s = F.log_softmax(student_logits / TEMPERATURE, dim=-1)
            log_t = F.log_softmax(teacher_logits / TEMPERATURE, dim=-1)
            kd = F.kl_div(log_s, log_t, reduction="sum", log_target=True) * TEMPERATURE**2
            ce = F.cross_entropy(student_logits, targets, reduction="sum")
            loss = ALPHA * ce + (1 - ALPHA) * kd
        else:
            teacher = CompanionHead(teacher_hidden, teacher_head, None)
            loss = chunked_head_loss(student_head, student_hidden, targets, weights,
                                     terms=distillation_loss(alpha=ALPHA, temperature=TEMPERATURE, teacher=TEACHER).head,
                                     chunk_tokens=LOSS_CHUNK_TOKENS, companions={TEACHER: teacher})
        loss.backward()
    except (MemoryError, RuntimeError) as error:  # the cap: "DefaultCPUAllocator: can't allocate memory"
        result = {"skipped": f"ran out of its {budget / 1e9:.1f} GB budget: {str(error).splitlines()[0][:200]}"}
        if baseline is not None:
            result["loss_extra_peak_bytes_before_failing"] = process_peak_rss() - baseline
        return result
    return {"loss_extra_peak_bytes": process_peak_rss() - baseline, "loss": float(loss.detach()),
            "grad_norms": [float(student_head.grad.norm()), float(student_hidden.grad.norm())],
            "input_bytes": sum(t.numel() * t.element_size() for t in (student_head, teacher_head, student_hidden,
                                                                       teacher_hidden, student_head.grad,
                                                                       student_hidden.grad))}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "matmul":
        result = train.run_matmul(args.matmul_n)
    elif args.worker.startswith("loss-"):
        result = run_loss_memory(args.worker[len("loss-"):], args.loss_positions, args.loss_vocab, args.budget)
    else:
        tokens = np.load(args.tokens_file)
        torch_engine = args.worker in ("torch", "transformers")
        matmul_before = train.run_matmul(args.matmul_n) if torch_engine else None
        if args.worker == "transformers":
            result = run_transformers(args.student, args.teacher, tokens, args.steps)
        elif args.worker == "mlx-lm":
            result = run_mlx_lm(args.student, args.teacher, tokens, args.steps)
        else:
            result = run_gemmalab(args.worker, args.student, args.teacher, tokens, args.steps, args.attention_chunk)
        if torch_engine:
            result["matmul"] = [matmul_before, train.run_matmul(args.matmul_n)]
    from gemmalab.bench import process_peak_rss

    result["peak_rss_bytes"] = process_peak_rss()
    print(json.dumps(result))


# --- the driver ---------------------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace, name: str, *extra: str) -> dict:
    detail = f" at {extra[1]} positions" if name.startswith("loss-") else ""
    print(f"running {name}{detail} ...", file=sys.stderr, flush=True)
    return decode.run_worker(__file__, name, args.threads, *extra)


def model_configs(args: argparse.Namespace):
    """(student, teacher) Gemma3Configs: the presets' shapes, the student on the teacher's vocabulary (or both
    on ``--vocab``)."""
    from gemmalab.config import Gemma3Config

    teacher = Gemma3Config.preset(args.teacher_preset)
    if args.vocab:
        teacher = dataclasses.replace(teacher, vocab_size=args.vocab)
    student = dataclasses.replace(Gemma3Config.preset(args.student_preset), vocab_size=teacher.vocab_size)
    return student, teacher


def write_checkpoints(root: Path, student, teacher, seed: int) -> tuple[Path, Path]:
    """The two random float32 checkpoints in HF layout (student seed ``seed``, teacher ``seed + 1``)."""
    from gemmalab import checkpoint
    from gemmalab.params import init_weights

    folders = []
    for name, config, model_seed in (("student", student, seed), ("teacher", teacher, seed + 1)):
        weights = init_weights(config, seed=model_seed)
        folders.append(checkpoint.save_checkpoint(root / name, config.with_dtype("float32"), weights))
        del weights
    return folders[0], folders[1]


def forward_flops(config, positions: int, batch: int) -> int:
    """Matmul FLOPs of one forward pass on ``positions`` = batch x length tokens: the linears, the head and
    full-square attention (QK^T and PV, what a masked SDPA kernel computes); a backward pass is 2x this."""
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = config.hidden_size * (2 * q + 2 * kv) + 3 * config.hidden_size * config.intermediate_size
    length = positions // batch
    attention = 4 * batch * config.num_attention_heads * length**2 * config.head_dim * config.num_hidden_layers
    return 2 * per_layer * config.num_hidden_layers * positions + 2 * config.vocab_size * config.hidden_size * positions \
        + attention


def step_flops(student, teacher, positions: int, batch: int) -> dict:
    out = {"student_fwd_bwd": 3 * forward_flops(student, positions, batch),
           "teacher_fwd": forward_flops(teacher, positions, batch)}
    out["total"] = out["student_fwd_bwd"] + out["teacher_fwd"]
    return out


def estimate_loss_bytes(kind: str, positions: int, vocab: int) -> int:
    """What a loss-memory worker needs in all, by the rough counts above: the inputs, the process, the loss."""
    inputs = 4 * (vocab * (2 * STUDENT_DIM + TEACHER_DIM) + positions * (2 * STUDENT_DIM + TEACHER_DIM))
    if kind == "naive":
        loss = NAIVE_COPIES * 4 * positions * vocab
    else:
        from gemmalab.train.spec import LOSS_CHUNK_TOKENS

        loss = 4 * (CHUNKED_CHUNK_COPIES * min(positions, LOSS_CHUNK_TOKENS) * vocab
                    + CHUNKED_HEAD_COPIES * vocab * STUDENT_DIM)
    return int(inputs + PROCESS_OVERHEAD + loss)


def loss_memory_part(args: argparse.Namespace) -> dict:
    """Both losses at every --positions (and the fallbacks when the naive one does not fit): see the docstring."""
    reserve = int(args.memory_reserve_gb * 1e9)
    measured: dict[int, dict[str, dict]] = {}
    notes: list[str] = []

    def measure(kind: str, positions: int) -> dict:
        need, available = estimate_loss_bytes(kind, positions, args.loss_vocab), mem_available()
        budget = available - reserve
        if need > budget:
            reason = (f"{kind} at {positions} positions x {args.loss_vocab} ids needs about {need / 1e9:.1f} GB; "
                      f"MemAvailable is {available / 1e9:.1f} GB, less a {reserve / 1e9:.1f} GB reserve: skipped")
            print(reason, file=sys.stderr, flush=True)
            result = {"skipped": reason, "estimated_need_bytes": need}
        else:
            result = run_worker(args, f"loss-{kind}", "--loss-positions", str(positions), "--loss-vocab",
                                str(args.loss_vocab), "--budget", str(budget))
            result["estimated_need_bytes"] = need
            if "skipped" in result:
                print(f"{kind} at {positions} positions: {result['skipped']}", file=sys.stderr, flush=True)
        measured.setdefault(positions, {})[kind] = result
        return result

    requested = sorted({int(p) for p in args.positions.split(",")})
    for positions in requested:
        measure("chunked", positions)
        measure("naive", positions)
    largest = requested[-1]
    if "skipped" in measured[largest]["naive"]:
        fallbacks, positions = [], largest // 2
        while positions >= 256 and len(fallbacks) < 2:
            if positions not in measured:
                if "skipped" not in measure("naive", positions) and "skipped" not in measure("chunked", positions):
                    fallbacks.append(positions)
            elif all("skipped" not in measured[positions].get(kind, {"skipped": ""}) for kind in ("naive", "chunked")):
                fallbacks.append(positions)
            positions //= 2
        if fallbacks:
            notes.append(f"the naive loss did not fit this machine's memory at {largest} positions: both losses were "
                         f"measured at {' and '.join(map(str, fallbacks))} positions instead, and the naive loss's memory "
                         "at the positions it skipped is a linear extrapolation (an estimate)")
        else:
            notes.append(f"the naive loss did not fit this machine's memory at {largest} positions, nor did both losses "
                         "at any halving down to 256: no ratio")
        print(notes[-1], file=sys.stderr, flush=True)
    rows = []
    naive_points = [(p, r["naive"]["loss_extra_peak_bytes"]) for p, r in sorted(measured.items())
                    if "skipped" not in r.get("naive", {"skipped": ""})]
    for positions in sorted(measured):
        row = {"positions": positions, **{f"{kind}": r for kind, r in measured[positions].items()}}
        chunked, naive = measured[positions].get("chunked", {}), measured[positions].get("naive", {})
        if "loss_extra_peak_bytes" in chunked and "skipped" not in chunked:
            if "skipped" not in naive and "loss_extra_peak_bytes" in naive:
                row["ratio"] = chunked["loss_extra_peak_bytes"] / naive["loss_extra_peak_bytes"]
                row["same_loss_rel_diff"] = abs(chunked["loss"] / naive["loss"] - 1)
                row["grad_norm_rel_diff"] = max(abs(a / b - 1) for a, b in zip(chunked["grad_norms"], naive["grad_norms"],
                                                                               strict=True))
            elif naive_points:
                # a line through the measured points (through the origin when there is only one)
                if len(naive_points) > 1:
                    slope, intercept = np.polyfit(*zip(*naive_points, strict=True), 1)
                else:
                    slope, intercept = naive_points[0][1] / naive_points[0][0], 0.0
                estimate = float(intercept + slope * positions)
                row["naive_extra_peak_bytes_extrapolated"] = estimate
                row["ratio_to_extrapolated"] = chunked["loss_extra_peak_bytes"] / estimate
        rows.append(row)
    return {"vocab": args.loss_vocab, "student_dim": STUDENT_DIM, "teacher_dim": TEACHER_DIM,
            "requested_positions": requested, "rows": rows, "notes": notes,
            "mem_available_at_end_bytes": mem_available()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--student", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--tokens-file", help=argparse.SUPPRESS)
    parser.add_argument("--loss-positions", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--engines", default="torch,transformers", help="torch,transformers or mlx,mlx-lm (or all four)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--student-preset", default="gemma-3-270m")
    parser.add_argument("--teacher-preset", default="gemma-3-1b")
    parser.add_argument("--vocab", type=int, default=0, help="give both models this many ids (0 = the teacher's)")
    parser.add_argument("--loss-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the KD loss's memory (torch, fresh process per measurement)")
    parser.add_argument("--positions", default="4096", help="positions of the loss-memory part, comma-separated")
    parser.add_argument("--loss-vocab", type=int, default=262_144, help="vocabulary of the loss-memory part")
    parser.add_argument("--memory-reserve-gb", type=float, default=2.0,
                        help="GB of MemAvailable the loss-memory part leaves to everything else")
    parser.add_argument("--rounds", type=int, default=1, help="run the step engines this many times, interleaved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="distill.json", help="file name under benchmarks/results/")
    parser.add_argument("--matmul-n", type=int, default=2048, help="size of the square matmul for the fp32 rate")
    parser.add_argument("--attention-chunk", type=int, default=128, help="query rows per chunk of the attention transfer")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    student, teacher = model_configs(args)
    positions = args.batch * args.seq
    report = {"batch": args.batch, "seq": args.seq, "threads": args.threads, "alpha": ALPHA, "temperature": TEMPERATURE,
              "student": {"preset": args.student_preset, "vocab": student.vocab_size,
                          "parameters": student.num_parameters()},
              "teacher": {"preset": args.teacher_preset, "vocab": teacher.vocab_size,
                          "parameters": teacher.num_parameters()},
              **train.machine(), "rows": [], "ratios": []}
    if args.loss_memory:  # first, while the driver holds little memory (nothing of the checkpoints yet)
        report["loss_memory"] = loss_memory_part(args)
    matmul = [run_worker(args, "matmul", "--matmul-n", str(args.matmul_n))]
    engines = [e for e in args.engines.split(",") if e]
    if engines:
        with tempfile.TemporaryDirectory(prefix="gemmalab-distill-") as tmp:
            print(f"writing the student ({student.num_parameters() / 1e6:.1f}M) and teacher "
                  f"({teacher.num_parameters() / 1e6:.1f}M) checkpoints ...", file=sys.stderr, flush=True)
            student_folder, teacher_folder = write_checkpoints(Path(tmp), student, teacher, args.seed)
            tokens_file = Path(tmp) / "tokens.npy"
            tokens = np.random.default_rng(args.seed).integers(3, student.vocab_size, size=(args.batch, args.seq + 1))
            np.save(tokens_file, tokens.astype(np.int32))
            results: dict[str, list[dict]] = {engine: [] for engine in engines}
            for _ in range(args.rounds):  # rounds interleave the engines, so a busy spell on a shared host hits both
                for engine in results:
                    results[engine].append(run_worker(
                        args, engine, "--student", str(student_folder), "--teacher", str(teacher_folder),
                        "--tokens-file", str(tokens_file), "--steps", str(args.steps)))
        flops = step_flops(student, teacher, positions, args.batch)
        for engine, runs in results.items():
            by_round = [statistics.median(r["step_s"]) for r in runs]
            step_s = statistics.median(by_round)
            first = runs[0]
            row = {"engine": engine, "step_s": step_s, "step_s_by_round": by_round,
                   "step_s_all": [t for r in runs for t in r["step_s"]], "tokens_per_s": positions / step_s,
                   "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
                   "losses": first["losses"], "ce": first["ce"], "kd": first["kd"], "flops": flops}
            if "first_exact_embed_scale" in first:
                row["first_exact_embed_scale"] = first["first_exact_embed_scale"]
            if "matmul" in first:
                row["matmul"] = [m for r in runs for m in r["matmul"]]
                matmul.extend(row["matmul"])
            report["rows"].append(row)
    matmul.append(run_worker(args, "matmul", "--matmul-n", str(args.matmul_n)))
    rate = max(m["best_GFLOPs"] for m in matmul) * 1e9  # the limit: the best this machine did in this run
    report["matmul"] = {"n": args.matmul_n, "runs": matmul, "limit_GFLOPs": rate / 1e9}
    for row in report["rows"]:
        row["matmul_limit_s"] = row["flops"]["total"] / rate
        row["fraction_of_matmul_limit"] = row["matmul_limit_s"] / row["step_s"]
    report["load_average_end"] = os.getloadavg()
    by_engine = {r["engine"]: r for r in report["rows"]}
    for ours, peer in PAIRS:
        a, b = by_engine.get(ours), by_engine.get(peer)
        if a and b:
            report["ratios"].append({
                "pair": f"gemmalab-{ours} / {peer}", "speed_ratio": a["tokens_per_s"] / b["tokens_per_s"],
                "speed_ratio_by_round": [y / x for x, y in zip(a["step_s_by_round"], b["step_s_by_round"], strict=True)],
                "peak_rss_ratio": a["peak_rss_bytes"] / b["peak_rss_bytes"],
                "first_loss": [a["losses"][0], b["losses"][0]],
                "first_loss_rel_diff": abs(a["losses"][0] / b["losses"][0] - 1),
                "first_ce_rel_diff": abs(a["ce"][0] / b["ce"][0] - 1),
                "first_kd_rel_diff": abs(a["kd"][0] / b["kd"][0] - 1),
                "last_loss_rel_diff": abs(a["losses"][-1] / b["losses"][-1] - 1),
            })
            if "first_exact_embed_scale" in b:
                exact = b["first_exact_embed_scale"]
                report["ratios"][-1]["first_loss_exact_embed_scale_rel_diff"] = {
                    key: abs(a[series][0] / exact[key] - 1) for key, series in (("loss", "losses"), ("ce", "ce"), ("kd", "kd"))}
    report["feature_costs"] = [
        {"pair": f"gemmalab-{engine} / gemmalab-{engine.removesuffix(FEATURES)}",
         "step_time_ratio": row["step_s"] / by_engine[engine.removesuffix(FEATURES)]["step_s"],
         "peak_rss_ratio": row["peak_rss_bytes"] / by_engine[engine.removesuffix(FEATURES)]["peak_rss_bytes"],
         "attention_chunk": args.attention_chunk}
        for engine, row in by_engine.items() if engine.endswith(FEATURES) and engine.removesuffix(FEATURES) in by_engine]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.results).write_text(json.dumps(report, indent=2) + "\n")
    print_report(args, report, rate)


def print_report(args: argparse.Namespace, report: dict, rate: float) -> None:
    s, t = report["student"], report["teacher"]
    print(f"{report['date']}, {report['cpu']}, {args.threads} threads, load average "
          f"{report['load_average_start'][0]:.1f} -> {report['load_average_end'][0]:.1f}")
    if report["rows"]:
        print(f"distillation step (fkl, alpha {ALPHA}, T {TEMPERATURE}), fp32, student {s['preset']} "
              f"({s['parameters'] / 1e6:.1f}M) <- teacher {t['preset']} ({t['parameters'] / 1e6:.1f}M), vocab "
              f"{s['vocab']}, batch {args.batch} x seq {args.seq}")
    print(f"fp32 matmul {args.matmul_n}^2, best / median of 8, GFLOP/s: "
          + ", ".join(f"{m['best_GFLOPs']:.0f}/{m['median_GFLOPs']:.0f}" for m in report["matmul"]["runs"])
          + f" (driver first and last; each torch engine before and after its steps); limit {rate / 1e9:.1f}")
    if report["rows"]:
        print(f"{'engine':<14}{'step s':>9}{'tokens/s':>11}{'peak RSS GB':>13}{'loss 1':>11}{'CE 1':>10}{'KD 1':>10}"
              f"{'GFLOP':>8}{'of limit':>10}")
        for r in report["rows"]:
            print(f"{r['engine']:<14}{r['step_s']:>9.2f}{r['tokens_per_s']:>11.1f}{r['peak_rss_bytes'] / 1e9:>13.2f}"
                  f"{r['losses'][0]:>11.5f}{r['ce'][0]:>10.5f}{r['kd'][0]:>10.5f}{r['flops']['total'] / 1e9:>8.1f}"
                  f"{r['fraction_of_matmul_limit']:>10.0%}")
    for r in report["ratios"]:
        rounds = ", ".join(f"x{x:.2f}" for x in r["speed_ratio_by_round"])
        print(f"{r['pair']:<32} speed x{r['speed_ratio']:.2f} (by round: {rounds})  peak RSS x{r['peak_rss_ratio']:.2f}  "
              f"step-1 loss {r['first_loss'][0]:.6f} vs {r['first_loss'][1]:.6f} (rel diff {r['first_loss_rel_diff']:.1e}; "
              f"CE {r['first_ce_rel_diff']:.1e}, KD {r['first_kd_rel_diff']:.1e}; last step {r['last_loss_rel_diff']:.1e})")
        if "first_loss_exact_embed_scale_rel_diff" in r:
            d = r["first_loss_exact_embed_scale_rel_diff"]
            print(f"{'':<32} with mlx-lm's embedding scale exact (not bf16-rounded), step-1 rel diff: loss {d['loss']:.1e}, "
                  f"CE {d['ce']:.1e}, KD {d['kd']:.1e}")
    for r in report.get("feature_costs", []):
        print(f"{r['pair']:<40} step time x{r['step_time_ratio']:.2f}  peak RSS x{r['peak_rss_ratio']:.2f}  "
              f"(hidden-state + attention transfer on every student block, {r['attention_chunk']} query rows a chunk)")
    m = report.get("loss_memory")
    if m:
        print(f"KD loss memory, fwd + bwd, vocab {m['vocab']}, student [n, {STUDENT_DIM}] (trained head), teacher "
              f"[n, {TEACHER_DIM}] (frozen head), extra peak RSS over the inputs:")
        print(f"{'positions':>10}{'naive GB':>12}{'gemmalab GB':>13}{'ratio':>8}{'same loss':>11}")
        for row in m["rows"]:
            chunked, naive = row.get("chunked", {}), row.get("naive", {})
            gl = "skipped" if "skipped" in chunked else "-" if not chunked else f"{chunked['loss_extra_peak_bytes'] / 1e9:.2f}"
            if "ratio" in row:
                nv, ratio = f"{naive['loss_extra_peak_bytes'] / 1e9:.2f}", f"{row['ratio']:.3f}"
                same = f"{row['same_loss_rel_diff']:.0e}"
            elif naive and "skipped" not in naive:
                nv, ratio, same = f"{naive['loss_extra_peak_bytes'] / 1e9:.2f}", "-", "-"
            elif "naive_extra_peak_bytes_extrapolated" in row:
                nv = f"~{row['naive_extra_peak_bytes_extrapolated'] / 1e9:.1f} est."
                ratio, same = f"~{row['ratio_to_extrapolated']:.3f}", "-"
            else:
                nv, ratio, same = "skipped", "-", "-"
            print(f"{row['positions']:>10}{nv:>12}{gl:>13}{ratio:>8}{same:>11}")
        for note in m["notes"]:
            print(f"note: {note}")


if __name__ == "__main__":
    main()
