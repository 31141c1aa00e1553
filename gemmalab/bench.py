"""``gemmalab bench``: prefill and decode speed, memory, and how close decoding gets to the memory roofline.

Decoding one token reads every weight once (the tied 262k-row head included) plus the KV cache, so its speed
limit is (memory read bandwidth) / (bytes read per token). The bandwidth is measured here, on this machine,
with a streaming read of a buffer far larger than any cache (numpy, one thread per core: reductions release
the GIL), and the result is reported next to the achieved tokens/s.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from .api import Model, init, load
from .dtypes import BYTES_PER_ELEMENT
from .generation import GenerationStats, Generator, decode_steps
from .sampling import SamplingParams

BANDWIDTH_BUFFER_BYTES = 1 << 30  # 1 GiB: far beyond any CPU cache


def measure_read_bandwidth(threads: int | None = None, repeats: int = 5) -> float:
    """Best-of-``repeats`` bytes/s of summing a 1 GiB float32 buffer split over ``threads`` threads."""
    threads = threads or os.cpu_count() or 1
    buffer = np.ones(BANDWIDTH_BUFFER_BYTES // 4, dtype=np.float32)
    parts = np.array_split(buffer, threads)
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=np.add.reduce, args=(part,)) for part in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best


def process_peak_rss() -> int:
    """This process's peak resident memory in bytes.

    On Linux it is VmHWM of /proc/self/status: ru_maxrss would also count the parent's memory at the time
    it started this process (Linux carries the high-water mark across fork and exec), which corrupts
    side-by-side measurements made in child processes. On macOS ru_maxrss is in bytes and is right.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_process_peak_rss() -> None:
    """Start a new peak-RSS measurement where the OS allows it (Linux: clear_refs 5 resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def measure_read_bandwidth_isolated(threads: int | None = None) -> float:
    """measure_read_bandwidth in a child process, so its 1 GiB buffer never counts in this process's peak."""
    code = f"from gemmalab.bench import measure_read_bandwidth; print(measure_read_bandwidth({threads!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip())


@dataclass
class BenchResult:
    backend: str
    model: str
    dtype: str
    device: str | None
    parameters: int
    prompt_tokens: int
    generated_tokens: int
    load_seconds: float
    warmup_seconds: float  # first (compiling, allocating) call, kept apart from steady state
    time_to_first_token_s: float
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    peak_memory_bytes: int
    peak_memory_kind: str  # "device" (framework's allocator) or "process RSS"
    kv_cache_bytes: dict[str, int]
    weight_bytes: int
    bytes_per_token: int
    bandwidth_bytes_per_s: float
    roofline_tokens_per_s: float
    roofline_fraction: float

    def as_dict(self) -> dict:
        return asdict(self)


def _timed_generation(model: Model, prompt: list[int], gen_tokens: int, prefill_chunk: int) -> tuple[GenerationStats, Generator]:
    backend = model._backend
    gen = Generator(backend, model.native, model.config, [prompt], params=SamplingParams(), prefill_chunk=prefill_chunk)
    stats = GenerationStats()
    for _ in decode_steps(gen, gen_tokens, stats):  # greedy, no stop ids: exactly gen_tokens tokens
        pass
    return stats, gen


def bench(
    backend: str,
    source: str | None = None,
    *,
    preset: str = "gemma-3-270m",
    dtype: str = "float32",
    device: str | None = None,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    prefill_chunk: int = 512,
    seed: int = 0,
    bandwidth: float | None = None,
    model: Model | None = None,
) -> BenchResult:
    """Benchmark one backend on ``source`` (a checkpoint) or a randomly initialised ``preset``."""
    start = time.perf_counter()
    if model is None:
        model = load(source, backend=backend, dtype=dtype, device=device) if source else init(
            preset, backend=backend, dtype=dtype, device=device, seed=seed
        )
    load_seconds = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    prompt = [int(t) for t in rng.integers(3, vocab, size=prompt_tokens)]

    # Warm-up with the very shapes of the timed run: compilers (jax.jit, mx.compile, torch.compile) build
    # one program per shape, and that time belongs in warmup_seconds, not in the steady-state numbers.
    start = time.perf_counter()
    _timed_generation(model, prompt, gen_tokens, prefill_chunk)
    warmup_seconds = time.perf_counter() - start

    be = model._backend
    be.reset_peak_memory(model.native)
    reset_process_peak_rss()
    stats, gen = _timed_generation(model, prompt, gen_tokens, prefill_chunk)
    peak = be.peak_memory(model.native)
    peak_kind = "device"
    if peak is None:
        peak, peak_kind = process_peak_rss(), "process RSS"
    kv = be.cache_nbytes(gen.cache)

    weight_bytes = model.config.num_parameters() * BYTES_PER_ELEMENT[model.dtype]
    bytes_per_token = weight_bytes + sum(kv.values())  # every weight and the whole cache, once per token
    bandwidth = bandwidth or measure_read_bandwidth_isolated()
    roofline = bandwidth / bytes_per_token
    return BenchResult(
        backend=model.backend,
        model=source or preset,
        dtype=model.dtype,
        device=device,
        parameters=model.config.num_parameters(),
        prompt_tokens=prompt_tokens,
        generated_tokens=gen_tokens,
        load_seconds=load_seconds,
        warmup_seconds=warmup_seconds,
        time_to_first_token_s=stats.prefill_seconds,
        prompt_tokens_per_s=stats.prompt_tokens_per_second,
        generation_tokens_per_s=stats.generation_tokens_per_second,
        peak_memory_bytes=int(peak),
        peak_memory_kind=peak_kind,
        kv_cache_bytes=kv,
        weight_bytes=weight_bytes,
        bytes_per_token=bytes_per_token,
        bandwidth_bytes_per_s=bandwidth,
        roofline_tokens_per_s=roofline,
        roofline_fraction=stats.generation_tokens_per_second / roofline,
    )
