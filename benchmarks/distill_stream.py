"""The layer-streamed teacher's memory: a teacher cache built with the whole teacher resident, and again with
only a few blocks resident at a time, side by side in one run.

    .venv/bin/python benchmarks/distill_stream.py                        # -> results/distill-stream.json
    .venv/bin/python benchmarks/distill_stream.py --backend mlx --results distill-stream-mlx.json
    .venv/bin/python benchmarks/distill_stream.py --preset tiny --vocab 4096 --results distill-stream-smoke.json

The teacher: a random checkpoint with the exact shape of ``--preset`` (gemma-3-4b: 34 blocks, hidden 2560, the
262208-id vocabulary), written once in ``--dtype`` (bfloat16, as Google ships it) as safetensors shards of at most
1 GiB, beside the byte-level tokenizer. The data: random bytes making ``--windows`` windows of ``--seq`` tokens.
Both engines run ``gemmalab.distill.cache.build_cache`` on the same teacher and data with the same settings (top-k
``--top-k``, ``--batch`` windows per pass, head chunks of ``--chunk-tokens`` tokens), each in a fresh process on
``--threads`` threads on ``--backend`` (so its peak RSS, VmHWM via gemmalab.bench.process_peak_rss, is its own):

* resident: the teacher built whole (Backend.build), then Backend.logit_chunks per pass;
* streamed: ``stream_layers=--stream-layers``: gemmalab.streaming.LayerStream reads the embedding, then each group
  of blocks, then the head, from the files, every pass going through a stage before the next is read.

Reported: the teacher's weight bytes, each engine's peak RSS and seconds, the streamed peak over the weight bytes
(the issue's target: at most 1/3, activations included), the largest stage's weight bytes
(LayerStream.resident_bytes), a process's RSS once the backend and gemmalab are imported (what no stream can go below),
and whether the two caches agree: the same top-k ids everywhere, the mean overlap of each position's top-k sets,
the largest log-probability difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode  # noqa: E402  (benchmarks/decode.py: the fresh-process worker runner)
import train  # noqa: E402  (benchmarks/train.py: machine(), run_matmul())

RESULTS = Path(__file__).resolve().parent / "results"


class RandomWeights(Mapping):
    """Canonical name -> a random array of its shape in ``dtype``, made when read (one at a time, so writing a
    checkpoint larger than memory holds one shard): normal(0, 0.02) matrices, normal(0, 0.3) norm weights."""

    def __init__(self, config, dtype: str, seed: int):
        from gemmalab.params import parameter_shapes

        self.shapes, self.dtype, self.seed = parameter_shapes(config), dtype, seed

    def __getitem__(self, name: str) -> np.ndarray:
        from gemmalab.dtypes import numpy_dtype

        rng = np.random.default_rng([self.seed, list(self.shapes).index(name)])
        std = 0.3 if name.endswith("norm.weight") else 0.02
        return (rng.standard_normal(self.shapes[name], dtype=np.float32) * std).astype(numpy_dtype(self.dtype))

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def write_teacher(folder: Path, args: argparse.Namespace):
    from gemmalab import checkpoint
    from gemmalab.config import Gemma3Config
    from gemmalab.tokenizer import Tokenizer

    config = Gemma3Config.preset(args.preset)
    if args.vocab:
        config = dataclasses.replace(config, vocab_size=args.vocab)
    config = config.with_dtype(args.dtype)
    checkpoint.save_checkpoint(folder, config, RandomWeights(config, args.dtype, args.seed), max_shard_bytes=2**30)
    Tokenizer.byte_level().save(folder)
    return config


def worker(args: argparse.Namespace) -> None:
    from gemmalab.backend import get_backend
    from gemmalab.bench import process_peak_rss

    get_backend(args.backend)  # the framework imported before the baseline reading
    if args.backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
    from gemmalab.distill.cache import build_cache

    imported = process_peak_rss()
    started = time.perf_counter()
    build_cache(args.teacher, args.data, args.out, top_k=args.top_k, seq_len=args.seq, batch_size=args.batch,
                chunk_tokens=args.chunk_tokens, backend=args.backend, progress=False, echo=lambda line: None,
                stream_layers=args.stream_layers if args.worker == "streamed" else None)
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_bytes": process_peak_rss(),
                      "peak_rss_after_imports_bytes": imported}))


def shards(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    manifest = json.loads((folder / "manifest.json").read_text())
    loaded = [load_file(folder / entry["file"]) for entry in manifest["shards"]]
    return {key: np.concatenate([part[key] for part in loaded]) for key in ("ids", "logprobs", "tail")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="torch", choices=("torch", "mlx", "jax"))
    parser.add_argument("--preset", default="gemma-3-4b")
    parser.add_argument("--vocab", type=int, default=0, help="give the teacher this many ids (0 = the preset's)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--stream-layers", type=int, default=4, help="blocks resident at once in the streamed build")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--chunk-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="distill-stream.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from gemmalab.params import parameter_bytes
    from gemmalab.streaming import LayerStream

    report = {"backend": args.backend, "preset": args.preset, "dtype": args.dtype, "stream_layers": args.stream_layers, "windows": args.windows,
              "seq": args.seq, "batch": args.batch, "top_k": args.top_k, "chunk_tokens": args.chunk_tokens,
              "threads": args.threads, **train.machine()}
    report["matmul"] = decode.run_worker(str(Path(__file__).resolve().parent / "distill.py"), "matmul", args.threads,
                                         "--matmul-n", "2048")
    with tempfile.TemporaryDirectory(prefix="gemmalab-stream-") as tmp:
        root = Path(tmp)
        print(f"writing a random {args.preset} teacher in {args.dtype} ...", file=sys.stderr, flush=True)
        config = write_teacher(root / "teacher", args)
        data = root / "data.txt"  # byte-level: seq + 1 tokens per window, one document (<bos> ... <eos>)
        text = np.random.default_rng(args.seed).integers(ord("a"), ord("z") + 1, args.windows * (args.seq + 1) - 2)
        data.write_text("".join(map(chr, text)), encoding="ascii")
        weight_bytes = parameter_bytes(config, 2 if args.dtype != "float32" else 4)
        stream = LayerStream.open(root / "teacher", layers_per_group=args.stream_layers, backend=args.backend)
        report["teacher"] = {"parameters": config.num_parameters(), "weight_bytes": weight_bytes,
                             "largest_stage_bytes": stream.resident_bytes(), "vocab": config.vocab_size,
                             "layers": config.num_hidden_layers}
        runs = {}
        for engine in ("resident", "streamed"):
            print(f"running {engine} ...", file=sys.stderr, flush=True)
            runs[engine] = decode.run_worker(__file__, engine, args.threads, "--teacher", str(root / "teacher"),
                                             "--data", str(data), "--out", str(root / engine), *_settings(args))
        resident, streamed = shards(root / "resident"), shards(root / "streamed")
    report["runs"] = runs
    report["streamed_peak_over_weights"] = runs["streamed"]["peak_rss_bytes"] / weight_bytes
    report["resident_peak_over_weights"] = runs["resident"]["peak_rss_bytes"] / weight_bytes
    report["streamed_over_resident_peak"] = runs["streamed"]["peak_rss_bytes"] / runs["resident"]["peak_rss_bytes"]
    report["same_top_k_ids"] = bool(np.array_equal(resident["ids"], streamed["ids"]))
    report["top_k_overlap"] = _overlap(resident["ids"], streamed["ids"])
    report["max_logprob_difference"] = float(np.abs(resident["logprobs"] - streamed["logprobs"]).max())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.results).write_text(json.dumps(report, indent=2) + "\n")
    gib = 2**30
    print(f"{args.backend}: teacher {args.preset} {args.dtype}: {weight_bytes / gib:.2f} GiB of weights, largest stage "
          f"{stream.resident_bytes() / gib:.2f} GiB ({args.stream_layers} blocks a group)")
    for engine, run in runs.items():
        print(f"  {engine:9s} peak RSS {run['peak_rss_bytes'] / gib:6.2f} GiB  ({run['peak_rss_bytes'] / weight_bytes:.2f} "
              f"of the weights)  {run['seconds']:7.1f} s")
    print(f"  after imports: {runs['streamed']['peak_rss_after_imports_bytes'] / gib:.2f} GiB; same top-k ids: "
          f"{report['same_top_k_ids']} (overlap {report['top_k_overlap']:.4f}), largest log-prob difference {report['max_logprob_difference']:.2e}")
    print(f"-> {RESULTS / args.results}")


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """The mean share of one position's top-k ids that the other cache holds too (1.0: the same sets); in
    bfloat16 two near-tied ids may trade places or leave the top-k at its edge."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.mean([len(np.intersect1d(x, y)) / a.shape[-1] for x, y in zip(a, b, strict=True)]))


def _settings(args: argparse.Namespace) -> list[str]:
    return ["--backend", args.backend, "--seq", str(args.seq), "--batch", str(args.batch), "--top-k", str(args.top_k), "--chunk-tokens",
            str(args.chunk_tokens), "--stream-layers", str(args.stream_layers)]


if __name__ == "__main__":
    main()
