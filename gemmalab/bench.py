"""``gemmalab bench``: prefill and decode speed, memory, and how close decoding gets to the memory roofline.

Decoding one token reads every weight once (the tied 262k-row head included) plus the KV cache, so its speed
limit is (memory read bandwidth) / (bytes read per token). The bandwidth is measured here, on this machine,
with a streaming read of a buffer far larger than any cache (numpy, one thread per core: reductions release
the GIL), and the result is reported next to the achieved tokens/s.

A benchmark runs generation twice with the same shapes: a warm-up (first calls compile and allocate; JAX
compiles one program per shape), timed apart as ``warmup_seconds``, then the measured run. Its phases are
reported to an optional ``progress`` callback, so a caller can show where a long run is.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from .api import Model, init, load
from .backend import resolve_backend_name
from .checks import is_count
from .config import Gemma3Config
from .dtypes import BYTES_PER_ELEMENT, canonical_dtype
from .errors import InputError
from .generation import GenerationStats, Generator, decode_steps
from .sampling import SamplingParams

BANDWIDTH_BUFFER_BYTES = 1 << 30  # 1 GiB: far beyond any CPU cache

# The phases a benchmark reports, in order. The two decoding phases report every token (done of total);
# the others report (0, 0) once, when they start.
LOADING, WARMUP_PREFILL, WARMUP_DECODING, PREFILL, DECODING = (
    "loading", "warm-up prefill", "warm-up decoding", "prefill", "decoding"
)
Progress = Callable[[str, int, int], None]  # (phase, done, total)


def _no_progress(phase: str, done: int, total: int) -> None:  # noqa: ARG001
    pass


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


def check_bench_inputs(
    backend: str,
    source: str | None = None,
    *,
    preset: str | None = "gemma-3-270m",
    dtype: str = "float32",
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    prefill_chunk: int = 512,
    bandwidth: float | None = None,
) -> None:
    """Refuse what ``bench`` cannot measure before any model is built: raises InputError, BackendError or
    ConfigError, each one line with the fix. ``preset`` (unless None) is checked when there is no ``source``;
    a checkpoint's positions are checked once its config is read (``check_fits``)."""
    if not is_count(prompt_tokens) or prompt_tokens < 1:
        raise InputError(f"prompt_tokens (--prompt-tokens) must be a whole number >= 1, got {prompt_tokens!r}: give e.g. 512")
    if not is_count(gen_tokens) or gen_tokens < 2:
        # The first new token comes out of prefill; decode speed is timed over the ones after it.
        raise InputError(
            f"gen_tokens (--gen-tokens) must be a whole number >= 2 (the first comes from prefill, decoding is timed on the "
            f"rest), got {gen_tokens!r}: give e.g. 128"
        )
    if not is_count(prefill_chunk) or prefill_chunk < 1:
        raise InputError(f"prefill_chunk (--prefill-chunk) must be a whole number >= 1, got {prefill_chunk!r}: give e.g. 512")
    if bandwidth is not None and not bandwidth > 0:
        raise InputError(f"bandwidth must be a positive number of bytes/s, got {bandwidth!r} (or None to measure it)")
    canonical_dtype(dtype)
    resolve_backend_name(backend)
    if not source and preset is not None:
        check_fits(Gemma3Config.preset(preset), prompt_tokens, gen_tokens)


def check_fits(config: Gemma3Config, prompt_tokens: int, gen_tokens: int) -> None:
    """Prompt and generated tokens must fit in the model's positions (generation would be cut short)."""
    limit = config.max_position_embeddings
    if prompt_tokens + gen_tokens > limit:
        raise InputError(
            f"prompt_tokens + gen_tokens = {prompt_tokens + gen_tokens} is more than the {limit} positions of "
            f"{config.name or 'this model'}: ask for fewer tokens"
        )


def _generation(
    model: Model, prompt: list[int], gen_tokens: int, prefill_chunk: int, progress: Progress, *, warmup: bool
) -> tuple[GenerationStats, Generator]:
    """One greedy generation of exactly ``gen_tokens`` tokens (no stop ids), its phases told to ``progress``.

    The callback runs between decoding steps, inside the timed interval of the next step (microseconds
    against the milliseconds of a step of the smallest Gemma)."""
    prefill_phase, decoding_phase = (WARMUP_PREFILL, WARMUP_DECODING) if warmup else (PREFILL, DECODING)
    gen = Generator(model._backend, model.native, model.config, [prompt], params=SamplingParams(),
                    prefill_chunk=prefill_chunk)
    stats = GenerationStats()
    progress(prefill_phase, 0, 0)
    for step in decode_steps(gen, gen_tokens, stats):
        progress(decoding_phase, step.index + 1, gen_tokens)
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
    progress: Progress | None = None,
) -> BenchResult:
    """Benchmark one backend on ``source`` (a checkpoint) or a randomly initialised ``preset``.

    ``progress(phase, done, total)`` is told each phase as it starts (LOADING, WARMUP_PREFILL,
    WARMUP_DECODING, PREFILL, DECODING) and each decoded token. ``bandwidth`` (bytes/s) skips measuring it.
    """
    check_bench_inputs(backend, source, preset=preset if model is None else None, dtype=dtype,
                       prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, prefill_chunk=prefill_chunk,
                       bandwidth=bandwidth)
    progress = progress or _no_progress
    start = time.perf_counter()
    if model is None:
        progress(LOADING, 0, 0)
        model = load(source, backend=backend, dtype=dtype, device=device) if source else init(
            preset, backend=backend, dtype=dtype, device=device, seed=seed
        )
    load_seconds = time.perf_counter() - start
    check_fits(model.config, prompt_tokens, gen_tokens)
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    prompt = [int(t) for t in rng.integers(3, vocab, size=prompt_tokens)]

    # Warm-up with the very shapes of the timed run: compilers (jax.jit, mx.compile, torch.compile) build
    # one program per shape, and that time belongs in warmup_seconds, not in the steady-state numbers.
    start = time.perf_counter()
    _generation(model, prompt, gen_tokens, prefill_chunk, progress, warmup=True)
    warmup_seconds = time.perf_counter() - start

    be = model._backend
    be.reset_peak_memory(model.native)
    reset_process_peak_rss()
    stats, gen = _generation(model, prompt, gen_tokens, prefill_chunk, progress, warmup=False)
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
