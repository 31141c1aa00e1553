"""``gemmalab bench``: prompt and decode speed, memory, and the memory-bandwidth roofline, per backend.

A full run on a 2-core CPU takes minutes (MLX's Linux CPU build alone spends more than two on the 270M
at prompt 512), so the command says where it is: a live display on a terminal, one line per phase on
stderr otherwise (stdout then holds only the table, or only the JSON). ``--quick`` is the short run
``make benchmark`` makes: the same measurements on fewer tokens, and the output says so.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from .app import command, console, err_console
from .common import DeviceOption, is_preset

if TYPE_CHECKING:  # the real imports wait until the command runs (they are cheap, but keep the CLI lean)
    from ..bench import BenchResult
    from ..bench import Progress as PhaseCallback

DEFAULT_PRESET = "gemma-3-270m"
FULL_TOKENS = (512, 128)  # (prompt, generated): the full run
# The short run: what a newcomer's `make benchmark` runs. Warm-up keeps the shapes of the timed run (JAX
# compiles per shape); fewer tokens is what makes it short: MLX's CPU build prefills 512 tokens in ~80 s.
QUICK_TOKENS = (128, 32)


@command()
def bench(
    source: Annotated[
        Optional[str],  # noqa: UP045
        typer.Argument(help="A preset (random weights, no download), a checkpoint folder or a Hub repo id; "
                            "default: --preset."),
    ] = None,
    backend: Annotated[str, typer.Option("--backend", "-b", help="mlx, torch, jax, all or auto.")] = "auto",
    preset: Annotated[str, typer.Option(help="Preset benchmarked when no SOURCE is given.")] = DEFAULT_PRESET,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    device: DeviceOption = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help=f"A short run: prompt {QUICK_TOKENS[0]}, generate {QUICK_TOKENS[1]} "
                        f"(instead of {FULL_TOKENS[0]} and {FULL_TOKENS[1]}).")] = False,
    prompt_tokens: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--prompt-tokens", help=f"Prompt length (default {FULL_TOKENS[0]}; {QUICK_TOKENS[0]} with --quick).",
        show_default=False)] = None,
    gen_tokens: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--gen-tokens", help=f"Tokens to generate, greedy (default {FULL_TOKENS[1]}; {QUICK_TOKENS[1]} with --quick).",
        show_default=False)] = None,
    prefill_chunk: Annotated[int, typer.Option("--prefill-chunk", help="Prefill chunk size.")] = 512,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines (progress stays on stderr).")] = False,
) -> None:
    """Prompt and generation tokens/s, time to first token, peak memory, and the memory-bandwidth roofline."""
    from ..backend import available_backends, resolve_backend_name
    from ..bench import bench as run_bench
    from ..bench import check_bench_inputs, measure_read_bandwidth_isolated
    from ..errors import BackendError

    full_command = _full_command(source, preset, dtype, device, backend)
    if source is not None and is_preset(source):  # `bench tiny` is `bench --preset tiny`, as in every command
        source, preset = None, source
    defaults = QUICK_TOKENS if quick else FULL_TOKENS
    prompt_tokens = defaults[0] if prompt_tokens is None else prompt_tokens
    gen_tokens = defaults[1] if gen_tokens is None else gen_tokens

    # Every check comes before the bandwidth measurement and the first model build: a typo costs a second.
    names = available_backends() if backend == "all" else [resolve_backend_name(None if backend == "auto" else backend)]
    if not names:
        raise BackendError("no backend is installed: run ./setup.sh, or `pip install 'gemmalab[torch]'`")
    for name in names:
        check_bench_inputs(name, source, preset=preset, dtype=dtype, prompt_tokens=prompt_tokens,
                           gen_tokens=gen_tokens, prefill_chunk=prefill_chunk)
    if source is not None:  # a checkpoint: find it and read its config now, not after the bandwidth test
        from ..bench import check_fits
        from .common import resolve_source

        check_fits(resolve_source(source).config, prompt_tokens, gen_tokens)
    model_name = source or f"{preset} (random weights)"
    shortened = _shortened_note(prompt_tokens, gen_tokens, full_command) if quick else None
    if shortened:
        err_console.print(shortened, markup=False, highlight=False, soft_wrap=True)

    results: list[BenchResult] = []
    with _reporter(model_name, prompt_tokens) as report:
        with report.task("memory read bandwidth") as progress:
            progress("measuring (a 1 GiB read, 5 times)", 0, 0)
            bandwidth = measure_read_bandwidth_isolated()
            report.done(f"{bandwidth / 1e9:.1f} GB/s")
        for name in names:
            with report.task(name) as progress:
                result = run_bench(
                    name, source, preset=preset, dtype=dtype, device=device, prompt_tokens=prompt_tokens,
                    gen_tokens=gen_tokens, prefill_chunk=prefill_chunk, bandwidth=bandwidth, progress=progress,
                )
                report.done(f"decode {result.generation_tokens_per_s:.1f} tokens/s")
            results.append(result)
            gc.collect()  # free this backend's model before the next one loads
    if as_json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
        return
    console.print(_table(results))
    console.print(
        f"[dim]roofline = measured read bandwidth {bandwidth / 1e9:.1f} GB/s ÷ bytes read per generated token "
        f"(all weights + KV cache). Warm-up is a first run with the same shapes, timed apart.[/]"
    )
    if shortened:
        console.print(shortened, markup=False, highlight=False, soft_wrap=True)


# -- what the command prints -------------------------------------------------------------------------------

def _full_command(source: str | None, preset: str, dtype: str, device: str | None, backend: str) -> str:
    """The command line of the full run of the same model, backends and dtype."""
    parts = ["gemmalab", "bench"]
    if source is not None:
        parts.append(source)
    elif preset != DEFAULT_PRESET:
        parts += ["--preset", preset]
    if dtype != "float32":
        parts += ["--dtype", dtype]
    if device is not None:
        parts += ["--device", device]
    return " ".join([*parts, "--backend", backend])


def _shortened_note(prompt_tokens: int, gen_tokens: int, full_command: str) -> str:
    """What --quick shortened, and the command of the full run, on lines short enough never to wrap."""
    return (f"quick run: prompt {prompt_tokens} tokens, generate {gen_tokens}, instead of {FULL_TOKENS[0]} "
            f"and {FULL_TOKENS[1]}\nfull run (several minutes on a CPU): {full_command}")


# One row per quantity, one column per backend: three backends fit in 80 columns with every label whole.
ROWS: Sequence[tuple[str, Callable[[BenchResult], str]]] = (
    ("load, s", lambda r: f"{r.load_seconds:.1f}"),
    ("warm-up run (compile), s", lambda r: f"{r.warmup_seconds:.2f}"),
    ("time to first token, s", lambda r: f"{r.time_to_first_token_s:.2f}"),
    ("prompt, tokens/s", lambda r: f"{r.prompt_tokens_per_s:.1f}"),
    ("decode, tokens/s", lambda r: f"{r.generation_tokens_per_s:.2f}"),
    ("decode roofline, tokens/s", lambda r: f"{r.roofline_tokens_per_s:.1f}"),
    ("decode / roofline", lambda r: f"{r.roofline_fraction:.0%}"),
    ("read per token, GB", lambda r: f"{r.bytes_per_token / 1e9:.3f}"),
    ("peak memory, GiB", lambda r: f"{r.peak_memory_bytes / 1024**3:.2f}"),
    ("peak memory counted as", lambda r: "process RSS" if r.peak_memory_kind == "process RSS" else "allocator"),
)


def _table(results: Sequence[BenchResult]) -> Table:
    first = results[0]
    table = Table(title=f"{first.model} · {first.dtype} · prompt {first.prompt_tokens} · "
                        f"generate {first.generated_tokens}")
    table.add_column("per backend")
    for r in results:
        table.add_column(r.backend, justify="right")
    for label, show in ROWS:
        table.add_row(label, *(show(r) for r in results))
    return table


# -- progress ----------------------------------------------------------------------------------------------

def _phase_text(phase: str, done: int, total: int, model: str, prompt_tokens: int, live: bool) -> str:
    from ..bench import DECODING, LOADING, PREFILL, WARMUP_DECODING, WARMUP_PREFILL

    count = f"{done}/{total}" if live else f"{total}"
    return {
        LOADING: f"loading {model}",
        WARMUP_PREFILL: f"warm-up (compile): prefill {prompt_tokens} tokens",
        WARMUP_DECODING: f"warm-up (compile): decoding {count} tokens",
        PREFILL: f"prefill {prompt_tokens} tokens",
        DECODING: f"decoding {count} tokens",
    }.get(phase, phase)


class _Lines:
    """Where no terminal shows a live display (a pipe, a log, CI): one line on stderr as each phase starts."""

    def __init__(self, model: str, prompt_tokens: int) -> None:
        self.model, self.prompt_tokens = model, prompt_tokens
        self._name, self._phase, self._start = "", "", 0.0

    @contextmanager
    def task(self, name: str) -> Iterator[PhaseCallback]:
        self._name, self._phase, self._start = name, "", time.perf_counter()
        yield self._progress

    def _progress(self, phase: str, done: int, total: int) -> None:
        if phase == self._phase:  # decoding reports every token: a line per phase is enough here
            return
        self._phase = phase
        self._print(_phase_text(phase, done, total, self.model, self.prompt_tokens, live=False))

    def done(self, summary: str) -> None:
        err_console.print(f"bench {self._name}: done in {self._elapsed():.1f} s: {summary}", markup=False,
                          highlight=False, soft_wrap=True)

    def _print(self, text: str) -> None:
        err_console.print(f"bench {self._name}: {text} (at {self._elapsed():.1f} s)", markup=False,
                          highlight=False, soft_wrap=True)

    def _elapsed(self) -> float:
        return time.perf_counter() - self._start


class _Live(_Lines):
    """On a terminal: a rich progress line per backend, with its phase, the tokens decoded and the time.

    rich redraws from a thread, 4 times a second, 1.6 ms a redraw here: about 6 ms of the GIL per second,
    against decode steps of 40 ms and more on the 270M. The callback itself only sets numbers (2 us).
    """

    def __init__(self, model: str, prompt_tokens: int) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        super().__init__(model, prompt_tokens)
        self.display = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=16),
                                TimeElapsedColumn(), console=err_console, refresh_per_second=4)
        self._task = None

    @contextmanager
    def task(self, name: str) -> Iterator[PhaseCallback]:
        self._name, self._phase = name, ""
        self._task = self.display.add_task(name, total=None)
        yield self._progress

    def _progress(self, phase: str, done: int, total: int) -> None:
        text = _phase_text(phase, done, total, self.model, self.prompt_tokens, live=True)
        self.display.update(self._task, description=f"{self._name}: {text}", total=total or None, completed=done)

    def done(self, summary: str) -> None:
        self.display.update(self._task, description=f"{self._name}: {summary}", total=1, completed=1)


@contextmanager
def _reporter(model: str, prompt_tokens: int) -> Iterator[_Lines]:
    if not (console.is_terminal and err_console.is_terminal):
        yield _Lines(model, prompt_tokens)
        return
    live = _Live(model, prompt_tokens)
    with live.display:
        yield live
