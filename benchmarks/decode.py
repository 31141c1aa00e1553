"""Decode and prefill speed, gemmalab beside its peer, in one run: ratios, not absolute claims.

    .venv/bin/python benchmarks/decode.py                       # 270M shape, fp32 and bf16, prompt 512, generate 128
    .venv/bin/python benchmarks/decode.py --dtypes float32 --prompt 128 --gen 32 --engines torch,transformers

Pairs: gemmalab-torch and gemmalab-jax vs transformers' ``generate``; gemmalab-mlx vs mlx-lm's ``generate_step``. Every
engine loads the same random checkpoint of the exact Gemma 3 270M shape (vocab 262144), written once per dtype
in HF format, and runs in a fresh process (so peak RSS is its own) with the same thread count. Greedy decoding,
no stop ids. Prefill time = time to the first new token; decode tokens/s counts the tokens after it.
Writes benchmarks/results/decode.json (``--results`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
PAIRS = [("torch", "transformers"), ("mlx", "mlx-lm"), ("jax", "transformers")]


# --- workers: each runs in its own process ----------------------------------------------------------------
def run_gemmalab(backend: str, folder: str, prompt: list[int], gen: int) -> dict:
    import gemmalab
    from gemmalab.generation import GenerationStats

    model = gemmalab.load(folder, backend=backend, device="cpu")
    # warm-up; jax compiles one program per shape, so it warms up on the timed shapes (compile time apart)
    warm = (prompt, gen) if backend == "jax" else (prompt[:16], 4)
    start = time.perf_counter()
    model.generate(warm[0], max_tokens=warm[1], stop=[])
    warmup_s = time.perf_counter() - start
    stats = GenerationStats()
    tokens = [c.token for c in model.stream(prompt, max_tokens=gen, stop=[], stats=stats)]
    return {"prefill_s": stats.prefill_seconds, "decode_tok_s": stats.generation_tokens_per_second, "tokens": tokens,
            "warmup_s": warmup_s}


def run_transformers(folder: str, prompt: list[int], gen: int) -> dict:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Timestamps each put(): the first is the prompt, then one per new token."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    model = transformers.Gemma3ForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        clock = Clock()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, streamer=clock, **kwargs)
    first, last = clock.times[1], clock.times[-1]
    return {
        "prefill_s": first - start,
        "decode_tok_s": (gen - 1) / (last - first),
        "tokens": out[0, len(prompt) :].tolist(),
    }


def run_mlx_lm(folder: str, prompt: list[int], gen: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder))
    for _ in generate_step(mx.array(prompt[:16]), model, max_tokens=4):  # warm-up
        pass
    tokens, times = [], []
    start = time.perf_counter()
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=gen, prefill_step_size=512):
        tokens.append(int(token))
        times.append(time.perf_counter())
    return {"prefill_s": times[0] - start, "decode_tok_s": (gen - 1) / (times[-1] - times[0]), "tokens": tokens}


def worker(args: argparse.Namespace) -> None:
    prompt = json.loads(Path(args.prompt_file).read_text())
    if args.worker == "transformers":
        result = run_transformers(args.checkpoint, prompt, args.gen)
    elif args.worker == "mlx-lm":
        result = run_mlx_lm(args.checkpoint, prompt, args.gen)
    else:
        result = run_gemmalab(args.worker, args.checkpoint, prompt, args.gen)
    from gemmalab.bench import process_peak_rss

    result["peak_rss_bytes"] = process_peak_rss()
    print(json.dumps(result))


# --- the driver -------------------------------------------------------------------------------------------
def write_checkpoints(root: Path, dtypes: list[str], seed: int) -> dict[str, Path]:
    """One random 270M-shaped checkpoint per dtype, HF layout, the same numbers rounded per dtype."""
    from gemmalab import checkpoint
    from gemmalab.config import Gemma3Config
    from gemmalab.params import init_weights

    config = Gemma3Config.preset("gemma-3-270m")
    weights = init_weights(config, seed=seed)
    return {
        dtype: checkpoint.save_checkpoint(root / dtype, config.with_dtype(dtype), weights) for dtype in dtypes
    }


def run_worker(script: str, name: str, threads: int, *args: str) -> dict:
    """``script --worker name --threads N args...`` in a fresh process limited to ``threads`` threads: the
    JSON object its last output line holds. Each benchmark's engines run this way, one process each."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, script, "--worker", name, "--threads", str(threads), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_engine(engine: str, folder: Path, prompt_file: Path, gen: int, threads: int) -> dict:
    return run_worker(__file__, engine, threads, "--checkpoint", str(folder), "--prompt-file", str(prompt_file),
                      "--gen", str(gen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", help=argparse.SUPPRESS)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--engines", default="torch,transformers,mlx,mlx-lm,jax")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="decode.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    engines = args.engines.split(",")
    dtypes = args.dtypes.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gemmalab-decode-") as tmp:
        folders = write_checkpoints(Path(tmp), dtypes, args.seed)
        prompt = np.random.default_rng(args.seed).integers(3, 262144, size=args.prompt).tolist()
        prompt_file = Path(tmp) / "prompt.json"
        prompt_file.write_text(json.dumps(prompt))
        for dtype in dtypes:
            for engine in engines:
                print(f"running {engine} {dtype} ...", file=sys.stderr, flush=True)
                result = run_engine(engine, folders[dtype], prompt_file, args.gen, args.threads)
                rows.append({"engine": engine, "dtype": dtype, **result})

    from gemmalab.bench import measure_read_bandwidth

    bandwidth = measure_read_bandwidth(args.threads)
    weight_bytes = {"float32": 4, "bfloat16": 2}
    report = {"prompt_tokens": args.prompt, "generated_tokens": args.gen, "threads": args.threads,
              "read_bandwidth_GBps": bandwidth / 1e9, "rows": [], "ratios": []}
    for row in rows:
        tokens = row.pop("tokens")
        row["prompt_tok_s"] = args.prompt / row["prefill_s"]
        row["roofline_tok_s"] = bandwidth / (268_098_176 * weight_bytes.get(row["dtype"], 4))
        row["tokens_head"] = tokens[:8]
        report["rows"].append(row)
    by_key = {(r["engine"], r["dtype"]): r for r in report["rows"]}
    for ours, peer in PAIRS:
        for dtype in dtypes:
            a, b = by_key.get((ours, dtype)), by_key.get((peer, dtype))
            if a and b:
                report["ratios"].append({
                    "pair": f"gemmalab-{ours} / {peer}", "dtype": dtype,
                    "decode_speed_ratio": a["decode_tok_s"] / b["decode_tok_s"],
                    "prefill_speed_ratio": b["prefill_s"] / a["prefill_s"],
                    "peak_rss_ratio": a["peak_rss_bytes"] / b["peak_rss_bytes"],
                    "same_greedy_tokens": a["tokens_head"] == b["tokens_head"],
                })
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.results).write_text(json.dumps(report, indent=2) + "\n")

    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {args.threads} threads, prompt {args.prompt}, generate {args.gen}")
    print(f"{'engine':<14}{'dtype':<10}{'prefill s':>10}{'prompt tok/s':>14}{'decode tok/s':>14}{'roofline':>10}{'peak RSS GB':>13}")
    for r in report["rows"]:
        print(f"{r['engine']:<14}{r['dtype']:<10}{r['prefill_s']:>10.2f}{r['prompt_tok_s']:>14.1f}"
              f"{r['decode_tok_s']:>14.2f}{r['decode_tok_s'] / r['roofline_tok_s']:>10.0%}{r['peak_rss_bytes'] / 1e9:>13.2f}")
    for r in report["ratios"]:
        print(f"{r['pair']:<32}{r['dtype']:<10} decode x{r['decode_speed_ratio']:.2f}  prefill x{r['prefill_speed_ratio']:.2f}"
              f"  peak RSS x{r['peak_rss_ratio']:.2f}  same greedy tokens: {r['same_greedy_tokens']}")


if __name__ == "__main__":
    main()
