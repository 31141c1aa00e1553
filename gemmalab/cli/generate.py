"""``gemmalab generate``: stream a continuation of a prompt."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from ..errors import InputError
from .app import command, err_console
from .common import BackendOption, DeviceOption, DtypeOption, open_model, resolve_source


def _ids(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"{flag} {text!r} is not a comma-separated list of integers, e.g. {flag} 1,106") from None


@command()
def generate(
    source: Annotated[str, typer.Argument(help="A checkpoint folder, a Hub repo id, or a preset (random weights).")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Text to continue.")] = None,  # noqa: UP045
    prompt_ids: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--prompt-ids", help="Comma-separated token ids, for models without a tokenizer."),
    ] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt as a user turn in Gemma's chat format.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="A system message (needs --chat).")] = None,  # noqa: UP045
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most new tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus mass to keep (1 = off).")] = 1.0,
    min_p: Annotated[float, typer.Option("--min-p", help="Keep tokens >= min_p x the top probability (0 = off).")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", help="1 = off.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling (and for preset weights).")] = None,  # noqa: UP045
    stop: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--stop", help="Stop when the text contains this string (repeatable; not shown in the output)."),
    ] = None,
    stop_ids: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--stop-ids", help="Extra comma-separated stop token ids (besides the checkpoint's eos ids)."),
    ] = None,
    adapter: Annotated[Optional[str], typer.Option("--adapter", help="Attach a LoRA / DoRA adapter: a PEFT or mlx-lm adapter folder, or a `gemmalab train --lora` checkpoint.")] = None,  # noqa: UP045
    backend: BackendOption = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end instead of streaming.")] = False,
) -> None:
    """Generate text, streamed as it comes. Stops at the checkpoint's eos ids (1 and 106 for Gemma -it)."""
    from ..generation import GenerationStats

    # Every check that needs no weights comes first: a mistake costs a second, not a model build.
    if (prompt is None) == (prompt_ids is None):
        raise InputError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if system is not None and not chat:
        raise InputError("--system only applies to a chat: add --chat (the prompt becomes the user's turn)")
    resolved = resolve_source(source)
    tokenizer = resolved.tokenizer
    if prompt is not None and tokenizer is None:
        raise InputError(f"{source} has no tokenizer: pass --prompt-ids with token ids instead of --prompt")
    if chat and prompt is None:
        raise InputError("--chat needs a text --prompt (and a model with a tokenizer)")
    if stop and tokenizer is None:
        raise InputError(f"{source} has no tokenizer, so stop strings cannot be matched: use --stop-ids")
    ids: list[int] | str = _ids(prompt_ids, "--prompt-ids") if prompt_ids is not None else prompt
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat(messages)
    stops: list[int | str] = [*(_ids(stop_ids, "--stop-ids") if stop_ids else []), *(stop or [])]
    sampling = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed, stop=stops or None,
    )

    model = open_model(resolved, backend, dtype, device, seed or 0, adapter=adapter)
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
