"""``gemmalab bench``: prompt and decode speed, memory, and the memory-bandwidth roofline, per backend."""

from __future__ import annotations

import gc
import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from .app import app, console
from .common import DeviceOption, gib


@app.command()
def bench(
    source: Annotated[Optional[str], typer.Argument(help="A checkpoint; default: a random preset (no download).")] = None,  # noqa: UP045
    backend: Annotated[str, typer.Option("--backend", "-b", help="mlx, torch, jax, all or auto.")] = "auto",
    preset: Annotated[str, typer.Option(help="Preset benchmarked when no SOURCE is given.")] = "gemma-3-270m",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    device: DeviceOption = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Prompt length.")] = 512,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", help="Tokens to generate (greedy).")] = 128,
    prefill_chunk: Annotated[int, typer.Option("--prefill-chunk", help="Prefill chunk size.")] = 512,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Prompt and generation tokens/s, time to first token, peak memory, and the memory-bandwidth roofline."""
    from ..backend import available_backends, resolve_backend_name
    from ..bench import bench as run_bench
    from ..bench import measure_read_bandwidth_isolated

    names = available_backends() if backend == "all" else [resolve_backend_name(None if backend == "auto" else backend)]
    with console.status("measuring memory read bandwidth"):
        bandwidth = measure_read_bandwidth_isolated()
    results = []
    for name in names:
        with console.status(f"benchmarking {name}: {source or preset} {dtype}, {prompt_tokens} + {gen_tokens} tokens"):
            results.append(run_bench(
                name, source, preset=preset, dtype=dtype, device=device, prompt_tokens=prompt_tokens,
                gen_tokens=gen_tokens, prefill_chunk=prefill_chunk, bandwidth=bandwidth,
            ))
        gc.collect()  # free this backend's model before the next one loads
    if as_json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
        return
    first = results[0]
    table = Table(title=f"{first.model} · {first.dtype} · prompt {prompt_tokens} · generate {gen_tokens}")
    for column in ("backend", "warm-up (compile) s", "first token s", "prompt tok/s", "decode tok/s", "peak memory",
                   "GB read/token", "roofline tok/s", "of roofline"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r.backend, f"{r.warmup_seconds:.2f}", f"{r.time_to_first_token_s:.2f}", f"{r.prompt_tokens_per_s:.1f}",
            f"{r.generation_tokens_per_s:.2f}", f"{gib(r.peak_memory_bytes)} ({r.peak_memory_kind})",
            f"{r.bytes_per_token / 1e9:.3f}", f"{r.roofline_tokens_per_s:.1f}", f"{r.roofline_fraction:.0%}",
        )
    console.print(table)
    console.print(
        f"[dim]roofline = measured read bandwidth {bandwidth / 1e9:.1f} GB/s ÷ bytes read per generated token "
        f"(all weights + KV cache)[/]"
    )
