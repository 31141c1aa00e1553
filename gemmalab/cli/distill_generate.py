"""``gemmalab distill generate``: the teacher's responses to prompts, as training data for the student
(gemmalab.distill.generate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .app import command, console
from .common import BackendOption, DeviceOption
from .distill import distill_app
from .train import _echo


@command("generate", on=distill_app)
def generate(
    teacher: Annotated[str, typer.Option("--teacher", help="The teacher: a checkpoint folder or Hub repo id, with its tokenizer.")],
    prompts: Annotated[Path, typer.Option("--prompts", help='A JSONL file, one {"prompt": ...} per line (other keys are kept in each record).')],
    out: Annotated[Path, typer.Option("--out", help="The JSONL file to write (run again with the same arguments to resume).")],
    cot: Annotated[bool, typer.Option("--cot", help="Ask for step-by-step reasoning: the prompt goes into the chain-of-thought template (--template to change it).")] = False,
    template: Annotated[Optional[str], typer.Option("--template", help="A prompt template with {prompt} where the prompt goes (default: none; with --cot, the built-in one).")] = None,  # noqa: UP045
    chat: Annotated[bool, typer.Option("--chat", help="For an instruction-tuned teacher: each prompt is a user turn in Gemma's chat format; the records are message lists.")] = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="New tokens per response at most.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per teacher batch.")] = 8,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature (0 = greedy).")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample from the k most likely tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling: the smallest set of tokens holding this probability.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed (batch b samples with seed + b).")] = 0,
    backend: BackendOption = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="The teacher's compute dtype: float32, bfloat16 or float16 (default: the checkpoint's).")] = None,  # noqa: UP045
    device: DeviceOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar: a plain line per batch.")] = False,
) -> None:
    """Sequence-level (and chain-of-thought) distillation data: the teacher answers every prompt.

    Each line of --out is {"index", "prompt_sha256", "prompt", "completion", "source", "settings"}: train the student on it with `gemmalab train --data OUT` (or `gemmalab distill --data OUT`), the loss on the completions only. A killed run resumes when run again with the same arguments; a file written with other settings is refused.
    """
    from ..distill.generate import COT_TEMPLATE, generate_data

    chosen = template if template is not None else COT_TEMPLATE if cot else None
    path = generate_data(teacher, prompts, out, template=chosen, chat=chat, max_tokens=max_tokens, batch_size=batch_size,
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, backend=backend, dtype=dtype,
                         device=device, progress=not quiet and console.is_terminal, echo=_echo)
    with path.open(encoding="utf-8") as handle:  # closed here, not whenever the collector runs
        lines = sum(1 for _ in handle)
    console.print(f"teacher responses: {escape(str(path))} ({lines} records)", soft_wrap=True)
