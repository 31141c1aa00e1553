"""The ``gemmalab`` command line (typer + rich).

Importing this module imports no array framework: each command imports its backend when it runs.
Expected failures (GemmalabError) print one line and exit 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import GemmalabError

app = typer.Typer(
    name="gemmalab",
    help="Gemma 3 research toolkit: exact models on MLX, PyTorch and JAX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
_debug = {"on": False}


def _version(value: bool) -> None:
    if value:
        console.print(f"gemmalab {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of a failure.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    _debug["on"] = debug or os.environ.get("GEMMALAB_DEBUG") == "1"


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 1024**3:.2f} GiB"


def _memory() -> dict[str, int | None]:
    """Total and available system memory in bytes, without psutil (it is not a core dependency)."""
    total = available = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"total": total, "available": available}


# ---------------------------------------------------------------------------------------------------------
@app.command()
def check(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Run each backend against the numpy reference.")
    ] = True,
) -> None:
    """Platform, installed backends with their versions and devices, memory, and an exactness self-test."""
    from .backend import _registered, probe
    from .selftest import FP32_TOLERANCE, verify_backend

    infos = [probe(name) for name in _registered()]
    errors: dict[str, float | str] = {}
    if verify:
        for i in infos:
            if i.usable:
                try:
                    errors[i.name] = verify_backend(i.name)
                except Exception as err:  # report, don't crash: check is the tool for broken installs
                    errors[i.name] = f"{type(err).__name__}: {err}"
    memory = _memory()
    report = {
        "gemmalab": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "memory": memory,
        "backends": [
            {
                "name": i.name,
                "usable": i.usable,
                "version": i.version,
                "devices": list(i.devices),
                "problem": i.problem,
                "reference_rel_error": errors.get(i.name),
            }
            for i in infos
        ],
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(f"[bold]gemmalab {__version__}[/] · Python {report['python']} · {report['platform']}")
    if memory["total"]:
        avail = f", {_gib(memory['available'])} available" if memory["available"] else ""
        console.print(f"memory: {_gib(memory['total'])} total{avail}")
    table = Table(title="backends")
    for column in ("backend", "status", "version", "devices", "exact vs reference (fp32)"):
        table.add_column(column)
    for i in infos:
        status = "[green]usable[/]" if i.usable else f"[red]not usable[/]: {escape(i.problem or '')}"
        error = errors.get(i.name)
        if isinstance(error, float):
            verdict = f"[green]yes[/] ({error:.1e})" if error <= FP32_TOLERANCE else f"[red]NO[/] ({error:.1e})"
        else:
            verdict = "-" if error is None else f"[red]failed[/]: {escape(error)}"
        table.add_row(i.name, status, i.version or "-", ", ".join(i.devices) or "-", verdict)
    console.print(table)
    if any(isinstance(e, str) or e > FP32_TOLERANCE for e in errors.values()):
        raise typer.Exit(1)


def _config_for_info(source: str):
    from . import checkpoint
    from .config import PRESETS, Gemma3Config

    if _is_preset(source):
        return Gemma3Config.preset(source), f"preset {Gemma3Config.preset(source).name}"
    path = Path(source).expanduser()
    if path.exists():
        return Gemma3Config.from_file(path), str(path)
    if checkpoint._looks_like_repo_id(source):
        # Only config.json is needed to describe a model: do not download its weights.
        from huggingface_hub import hf_hub_download

        try:
            return Gemma3Config.from_file(hf_hub_download(source, "config.json")), source
        except Exception as err:
            if isinstance(err, GemmalabError):
                raise
            raise checkpoint.ModelNotFoundError(
                f"cannot read config.json of {source} ({type(err).__name__}): check the name and network, "
                f"or pass a local folder or a preset ({', '.join(PRESETS)})"
            ) from None
    raise checkpoint.ModelNotFoundError(f"{source} is not a preset, a folder or a repo id: check the spelling")


@app.command()
def info(
    source: Annotated[str, typer.Argument(help="A preset (gemma-3-270m ...), a checkpoint folder or a Hub repo id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Shape of a model: layer pattern, attention, RoPE, parameter count and memory per dtype."""
    from .dtypes import BYTES_PER_ELEMENT, DTYPES

    config, where = _config_for_info(source)
    n_params = config.num_parameters()
    embed = config.vocab_size * config.hidden_size
    # KV cache per token of context, per layer kind: keys + values, kv heads x head_dim, in bf16.
    kv_per_token = 2 * config.num_key_value_heads * config.head_dim * 2
    n_global = sum(not config.is_sliding(i) for i in range(config.num_hidden_layers))
    report = {
        "source": where,
        "layers": config.num_hidden_layers,
        "layer_pattern": config.describe_layers(),
        "local_layers": config.num_hidden_layers - n_global,
        "global_layers": n_global,
        "sliding_window": config.sliding_window,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "vocab_size": config.vocab_size,
        "rope_local": {"theta": config.rope_local.theta, "linear_factor": config.rope_local.factor},
        "rope_global": {"theta": config.rope_global.theta, "linear_factor": config.rope_global.factor},
        "tied_embeddings": config.tie_word_embeddings,
        "parameters": n_params,
        "embedding_parameters": embed,
        "stored_dtype": config.stored_dtype,
        "weight_bytes": {d: n_params * BYTES_PER_ELEMENT[d] for d in DTYPES},
        "kv_cache_bytes_bf16": {
            "global_per_token": kv_per_token * n_global,
            "local_max": kv_per_token * (config.num_hidden_layers - n_global) * config.sliding_window,
        },
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"Gemma 3 · {where}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("layers", f"{config.num_hidden_layers}: {config.describe_layers()} (L local, G global)")
    table.add_row("sliding window", f"{config.sliding_window} tokens on {report['local_layers']} local layers")
    table.add_row("hidden / MLP", f"{config.hidden_size} / {config.intermediate_size}")
    table.add_row(
        "attention",
        f"{config.num_attention_heads} heads, {config.num_key_value_heads} kv heads, head_dim {config.head_dim}, "
        f"scale 1/sqrt({config.query_pre_attn_scalar:g})",
    )
    table.add_row(
        "RoPE",
        f"local base {config.rope_local.theta:g} x{config.rope_local.factor:g}, "
        f"global base {config.rope_global.theta:g} x{config.rope_global.factor:g} (linear)",
    )
    table.add_row("vocabulary", f"{config.vocab_size:,} ({'tied' if config.tie_word_embeddings else 'untied'} head)")
    table.add_row("parameters", f"{n_params:,} ({embed / n_params:.0%} in the embedding)")
    for d in DTYPES:
        table.add_row(f"weights {d}", _gib(report["weight_bytes"][d]))
    kv = report["kv_cache_bytes_bf16"]
    table.add_row(
        "KV cache (bf16)",
        f"{kv['global_per_token'] / 1024:.1f} KiB per token on global layers; "
        f"local layers capped at {_gib(kv['local_max'])}",
    )
    if config.stored_dtype:
        table.add_row("stored dtype", config.stored_dtype)
    console.print(table)


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="A checkpoint folder or Hub repo id.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the converted checkpoint to.")],
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 (bf16) or float16 (fp16).")] = "bfloat16",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace weights already in OUT.")] = False,
) -> None:
    """Rewrite a checkpoint as text-only Gemma3ForCausalLM safetensors in another dtype.

    Works tensor by tensor in numpy, with no backend: multimodal checkpoints come out text-only, in the layout
    transformers and mlx-lm load.
    """
    from . import checkpoint
    from .dtypes import canonical_dtype

    target = canonical_dtype(dtype)
    folder = checkpoint.locate(source)
    config = checkpoint.load_config(folder)
    weights = checkpoint.read_weights(folder, config)
    with console.status(f"writing {out} in {target}"):
        checkpoint.save_checkpoint(out, config.with_dtype(target), weights, copy_from=folder, overwrite=overwrite)
    aside = f"; left aside {len(weights.set_aside)} vision/duplicate tensors" if weights.set_aside else ""
    console.print(f"wrote {out} ({config.num_parameters():,} parameters, {target}{aside})")


@app.command()
def download(
    repo_id: Annotated[str, typer.Argument(help="Hub repository, e.g. google/gemma-3-270m.")],
    revision: Annotated[Optional[str], typer.Option(help="Branch, tag or commit.")] = None,  # noqa: UP045
) -> None:
    """Download a checkpoint's safetensors, config and tokenizer into the Hugging Face cache."""
    from . import checkpoint

    folder = checkpoint.locate(repo_id, revision=revision)
    config = checkpoint.load_config(folder)
    console.print(f"{repo_id} is at {folder} ({config.num_parameters():,} parameters)")


BackendOption = Annotated[
    Optional[str],  # noqa: UP045  (typer reads the annotation at run time)
    typer.Option("--backend", "-b", help="mlx, torch, jax or auto (default: $GEMMALAB_BACKEND, else auto)."),
]
DtypeOption = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)."),
]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="cuda:0, mps, gpu, cpu ... (default: the best)")]  # noqa: UP045


def _is_preset(source: str) -> bool:
    from .config import PRESETS, preset_key

    return preset_key(source) in PRESETS and not Path(source).exists() and "/" not in source


def _model(source: str, backend: str | None, dtype: str | None, device: str | None, seed: int = 0):
    """A checkpoint (folder, cached or Hub repo id), or a preset name with random weights."""
    import gemmalab

    if _is_preset(source):
        return gemmalab.init(source, backend=backend, dtype=dtype, device=device, seed=seed)
    return gemmalab.load(source, backend=backend, dtype=dtype, device=device)


@app.command()
def generate(
    source: Annotated[str, typer.Argument(help="A checkpoint folder, a Hub repo id, or a preset (random weights).")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Text to continue.")] = None,  # noqa: UP045
    prompt_ids: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--prompt-ids", help="Comma-separated token ids, for models without a tokenizer."),
    ] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt as a user turn in Gemma's chat format.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="A system message (with --chat).")] = None,  # noqa: UP045
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most new tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus mass to keep (1 = off).")] = 1.0,
    min_p: Annotated[float, typer.Option("--min-p", help="Keep tokens >= min_p x the top probability (0 = off).")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", help="1 = off.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling (and for preset weights).")] = None,  # noqa: UP045
    stop: Annotated[Optional[str], typer.Option(help="Extra comma-separated stop token ids.")] = None,  # noqa: UP045
    backend: BackendOption = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end instead of streaming.")] = False,
) -> None:
    """Generate text, streamed as it comes. Stops at the checkpoint's eos ids (1 and 106 for Gemma -it)."""
    from .errors import InputError
    from .generation import GenerationStats

    if (prompt is None) == (prompt_ids is None):
        raise InputError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    model = _model(source, backend, dtype, device, seed or 0)
    if prompt_ids is not None:
        try:
            ids: list[int] | str = [int(t) for t in prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise InputError(f"--prompt-ids {prompt_ids!r} is not a comma-separated list of integers") from None
    else:
        ids = prompt
    if chat:
        if model.tokenizer is None or not isinstance(ids, str):
            raise InputError("--chat needs a text --prompt and a model with a tokenizer")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": ids}]
        ids = model.tokenizer.apply_chat(messages)
    elif isinstance(ids, str) and model.tokenizer is None:
        raise InputError(f"{source} has no tokenizer: pass --prompt-ids with token ids instead of --prompt")
    extra_stop = [int(t) for t in stop.split(",")] if stop else None
    sampling = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed, stop=extra_stop,
    )
    if as_json:
        result = model.generate(ids, max_tokens, **sampling)
        print(json.dumps({
            "tokens": result.tokens, "text": result.text, "finish_reason": result.finish_reasons[0],
            "stats": result.stats.as_dict(), "backend": model.backend, "dtype": model.dtype,
        }))
        return
    stats = GenerationStats()
    for chunk in model.stream(ids, max_tokens, stats=stats, **sampling):
        sys.stdout.write(chunk.text if model.tokenizer is not None else f"{chunk.token} ")
        sys.stdout.flush()
    sys.stdout.write("\n")
    err_console.print(
        f"[dim]{stats.prompt_tokens} prompt tokens, {stats.generated_tokens} new · "
        f"first token {stats.prefill_seconds:.2f}s · {stats.generation_tokens_per_second:.1f} tok/s · "
        f"{model.backend} {model.dtype}[/]"
    )


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
    from .backend import available_backends, resolve_backend_name
    from .bench import bench as run_bench
    from .bench import measure_read_bandwidth_isolated

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
            f"{r.generation_tokens_per_s:.2f}", f"{_gib(r.peak_memory_bytes)} ({r.peak_memory_kind})",
            f"{r.bytes_per_token / 1e9:.3f}", f"{r.roofline_tokens_per_s:.1f}", f"{r.roofline_fraction:.0%}",
        )
    console.print(table)
    console.print(
        f"[dim]roofline = measured read bandwidth {bandwidth / 1e9:.1f} GB/s ÷ bytes read per generated token "
        f"(all weights + KV cache)[/]"
    )


@app.command()
def train(
    config_file: Annotated[Optional[Path], typer.Option("--config", help="A YAML file of training settings.")] = None,  # noqa: UP045
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="Override any setting: --set key=value (repeatable).")] = None,  # noqa: UP045
    preset: Annotated[Optional[str], typer.Option(help="Train from random init of a preset (default: tiny, byte-level).")] = None,  # noqa: UP045
    model: Annotated[Optional[str], typer.Option("--model", help="Fine-tune a checkpoint folder or Hub repo id.")] = None,  # noqa: UP045
    data: Annotated[Optional[str], typer.Option(help="Text file, .jsonl (text or chat messages) or folder (default: the embedded corpus).")] = None,  # noqa: UP045
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,  # noqa: UP045
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Sequences per micro-batch.")] = None,  # noqa: UP045
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-batches per step.")] = None,  # noqa: UP045
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per sequence.")] = None,  # noqa: UP045
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,  # noqa: UP045
    optimizer: Annotated[Optional[str], typer.Option(help="adamw or adafactor.")] = None,  # noqa: UP045
    backend: BackendOption = None,
    device: DeviceOption = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the init and the data order.")] = None,  # noqa: UP045
    out: Annotated[Optional[str], typer.Option(help="Run folder: metrics.jsonl, tensorboard/, checkpoints/.")] = None,  # noqa: UP045
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help="Steps between checkpoints (0 = at the end).")] = None,  # noqa: UP045
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train or fine-tune a model: full-parameter training with AdamW or Adafactor on any backend."""
    from .train import TrainConfig, checkpoints
    from .train import train as run_training

    flags = {
        "preset": preset, "model": model, "data": data, "steps": steps, "batch_size": batch_size,
        "grad_accum": grad_accum, "seq_len": seq_len, "lr": lr, "optimizer": optimizer, "backend": backend,
        "device": device, "seed": seed, "out": out, "checkpoint_every": checkpoint_every, "resume": resume or None,
    }
    config = TrainConfig.from_sources(config_file, sets, flags)
    if config.resume and (last := checkpoints.latest(Path(config.out))) is not None:
        # the run's own settings first, so `--out DIR --resume` is enough; what is given here overrides them
        config = TrainConfig.from_sources(config_file, sets, flags, base=checkpoints.read_state(last)["config"])
    source = config.model or f"preset {config.preset} (random init)"
    console.print(f"training {escape(source)} for {config.steps} steps -> {escape(config.out)}")
    result = run_training(config, progress=not quiet and console.is_terminal, echo=console.print)
    summary = f"done: step {result.steps}, loss {result.final_loss:.4f}"
    if result.eval_loss is not None:
        summary += f", held-out loss {result.eval_loss:.4f} (perplexity {math.exp(min(result.eval_loss, 700)):.2f})"
    console.print(summary)
    # One line each, never wrapped: paths are for copying.
    console.print(f"checkpoint: {escape(str(result.checkpoint))}", soft_wrap=True)
    console.print(f"metrics: {escape(str(result.run_dir / 'metrics.jsonl'))}", soft_wrap=True)


@app.command("eval")
def eval_command(
    source: Annotated[str, typer.Argument(help="A checkpoint folder, a Hub repo id, or a preset (random weights).")],
    data: Annotated[Optional[str], typer.Option(help="Text file, .jsonl or folder (default: the embedded corpus).")] = None,  # noqa: UP045
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per batch.")] = 8,
    max_batches: Annotated[Optional[int], typer.Option("--max-batches", help="Stop after this many batches.")] = None,  # noqa: UP045
    backend: BackendOption = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = "float32",
    device: DeviceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Perplexity and tokens/s of a model on a data source."""
    from .train.evaluation import perplexity

    model = _model(source, backend, dtype, device)
    result = perplexity(model, data, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches,
                        progress=not as_json and console.is_terminal)
    if as_json:
        print(json.dumps({"source": source, "backend": model.backend, **result.as_dict()}))
        return
    console.print(
        f"{escape(source)} on {model.backend}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f} "
        f"over {result.tokens:,} tokens ({result.tokens_per_s:,.0f} tokens/s)"
    )


def main() -> None:
    """Console-script entry point: run the app, turning expected failures into one line.

    typer's standalone mode prints usage errors itself and exits; gemmalab errors are caught here.
    """
    try:
        app()
    except GemmalabError as err:
        if _debug["on"]:
            raise
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True, style="red")
        sys.exit(1)


if __name__ == "__main__":
    main()
