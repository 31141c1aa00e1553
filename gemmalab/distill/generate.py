"""Sequence-level distillation data: the teacher writes a response to each prompt, and the student then trains
on those responses (``gemmalab train --data DATA.jsonl``: the loss falls on the completions only).

``generate_data(teacher, prompts, out)`` reads prompts from a JSONL file (one ``{"prompt": "..."}`` per line;
other keys are carried into the record), feeds them to the teacher ``batch_size`` at a time through the
generation layer (``Model.generate``: its sliding-window caches and samplers), and appends one record per
prompt to ``out``::

    {"index": i, "prompt_sha256": ..., "prompt": <what the teacher was given>, "completion": <its response>,
     "source": <the prompt line's other keys>, "settings": {...}}

``prompt``/``completion`` is the pair ``gemmalab train`` reads. With a template (``--cot`` takes
``COT_TEMPLATE``), the prompt is the template with ``{prompt}`` filled in, and the student trains on the same
templated prompt, so it learns to reason when asked as the teacher was. With ``chat`` (an instruction-tuned
teacher), the prompt goes in as a user turn in Gemma's chat format, the response ends at <end_of_turn>, and
the record holds the two as message lists (``[{"role": "user", ...}]``, ``[{"role": "assistant", ...}]``:
TRL's conversational form, which ``gemmalab train`` reads as one chat trained on the reply).

A batch's records are appended and flushed to disk together; a killed run leaves at most a partly written
last batch. The next run with the same arguments drops a half-written last line and goes on from the first
prompt without a record. The sampling seed of each batch is ``seed + batch index``, so a resumed file equals an uninterrupted
one. A file written with other settings (or from other prompts) is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError
from ..train.data import jsonl_records

COT_TEMPLATE = "{prompt}\nWork it out step by step, then give the answer on the last line."
Echo = Callable[[str], None]


@dataclass(frozen=True)
class GenerateSettings:
    """What a generated file's records were made with; a resumed run must match them."""

    teacher: str  # teacher_fingerprint of the checkpoint (its config and weights)
    template: str | None = None
    chat: bool = False
    max_tokens: int = 256
    batch_size: int = 8
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.template is not None and "{prompt}" not in self.template:
            raise ConfigError(f"the template {self.template!r} has no {{prompt}}: put {{prompt}} where the prompt goes")
        for name in ("max_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    def fill(self, prompt: str) -> str:
        """The text the teacher is given for ``prompt``."""
        return prompt if self.template is None else self.template.replace("{prompt}", prompt)


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file as a dict with a ``prompt`` string; a bad line stops with its number."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"no prompts file at {path}: pass --prompts FILE.jsonl, one {{\"prompt\": ...}} per line")
    prompts = []
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise InputError(f'{path}:{number} has no "prompt" string: one {{"prompt": ...}} object per line')
        prompts.append(record)
    if not prompts:
        raise InputError(f"{path} holds no prompts: one {{\"prompt\": ...}} object per line")
    return prompts


def _prompt_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


# Every record starts with this, so the tail a killed write leaves can be told from the end of someone else's file.
RECORD_START = '{"index": '


def _records_done(out: Path, settings: GenerateSettings, prompts: list[dict[str, Any]]) -> int:
    """How many prompts ``out`` already answers. Its complete lines must be this run's records (the same
    settings, the same prompts in order), or it is refused untouched; then a half-written last line, which only
    a killed write leaves, is dropped."""
    if not out.exists():
        return 0
    data = out.read_bytes()
    cut = data.rfind(b"\n") + 1
    complete, tail = data[:cut], data[cut:].decode("utf-8", errors="replace")
    lines = complete.decode("utf-8", errors="replace").splitlines()
    mine = asdict(settings)
    for index, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "settings" not in record:
            raise InputError(f"{out}:{index + 1} is not a record of gemmalab distill generate: choose another --out")
        if record["settings"] != mine:
            raise ConfigError(f"{out} was written with other settings ({record['settings']}): run with those, "
                              f"or choose another --out")
        if index >= len(prompts) or record.get("index") != index or \
                record.get("prompt_sha256") != _prompt_digest(settings.fill(prompts[index]["prompt"])):
            raise ConfigError(f"{out} was written from other prompts (record {index + 1} does not match): "
                              f"choose another --out")
    if tail:
        if not (tail.startswith(RECORD_START) or RECORD_START.startswith(tail)):
            raise InputError(f"{out} ends in a line that is not a record of gemmalab distill generate: choose another --out")
        with out.open("r+b") as handle:  # the half record of a killed write
            handle.truncate(cut)
    return len(lines)


def generate_data(teacher: str | Path, prompts: str | Path, out: str | Path, *, template: str | None = None,
                  chat: bool = False, max_tokens: int = 256, batch_size: int = 8, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int = 0, backend: str | None = None, dtype: str | None = None,
                  device: str | None = None, progress: bool = True, echo: Echo = print) -> Path:
    """Write (or finish) ``out``: one teacher response per prompt (the module docstring). Returns its path."""
    import gemmalab

    from .. import checkpoint
    from .cache_format import teacher_fingerprint

    folder = checkpoint.locate(teacher)
    settings = GenerateSettings(teacher_fingerprint(folder), template, chat, max_tokens, batch_size, temperature,
                                top_k, top_p, seed)
    records = read_prompts(prompts)
    out = Path(out).expanduser()
    if out.is_dir():
        raise InputError(f"--out {out} is a folder: give a .jsonl file path")
    done = _records_done(out, settings, records)
    if done == len(records):
        echo(f"{out}: all {done} prompts already answered")
        return out
    model = gemmalab.load(folder, backend=backend, dtype=dtype, device=device)
    if model.tokenizer is None:
        raise InputError(f"the teacher {teacher} has no tokenizer: generating text needs its tokenizer.json")
    tokenizer = model.tokenizer
    end_of_turn = tokenizer.end_of_turn_id if chat else None
    if chat and end_of_turn is None:
        raise InputError(f"the teacher {teacher}'s tokenizer has no <end_of_turn> token, so it cannot chat: drop --chat")
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = _Progress(len(records), done, progress, echo)
    try:
        with out.open("a", encoding="utf-8") as handle:
            # A batch cut short by a kill is generated again whole (the same prompts and seed give the same
            # responses), and only its missing records are written.
            for start in range(done - done % batch_size, len(records), batch_size):
                batch = records[start : start + batch_size]
                texts = [settings.fill(record["prompt"]) for record in batch]
                inputs = [tokenizer.apply_chat([{"role": "user", "content": t}]) for t in texts] if chat else texts
                result = model.generate(inputs, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                        seed=seed + start // batch_size,
                                        stop=[end_of_turn] if end_of_turn is not None else None)
                lines = []
                for offset, (record, text, response) in enumerate(zip(batch, texts, result.texts, strict=True)):
                    if start + offset < done:
                        continue
                    source = {key: value for key, value in record.items() if key != "prompt"}
                    pair = ([{"role": "user", "content": text}], [{"role": "assistant", "content": response}]) if chat \
                        else (text, response)
                    lines.append(json.dumps({"index": start + offset, "prompt_sha256": _prompt_digest(text),
                                             "prompt": pair[0], "completion": pair[1], "source": source,
                                             "settings": asdict(settings)}, ensure_ascii=False) + "\n")
                handle.write("".join(lines))  # the batch's records together, then to disk
                handle.flush()
                os.fsync(handle.fileno())
                bar.advance(len(lines))
    finally:
        bar.close()
    return out


class _Progress:
    """A rich bar over prompts when enabled, else one plain line per batch."""

    def __init__(self, total: int, done: int, enabled: bool, echo: Echo):
        self.total, self.done, self.echo, self.bar = total, done, echo, None
        self.started, self.fresh = time.monotonic(), 0
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]teacher responses"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn())
            self.task = self.bar.add_task("generate", total=total, completed=done, rate="")
            self.bar.start()

    def advance(self, count: int) -> None:
        self.done, self.fresh = self.done + count, self.fresh + count
        rate = self.fresh / max(time.monotonic() - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, advance=count, rate=f"{rate:.2f} prompts/s")
        else:
            self.echo(f"teacher responses: {self.done} of {self.total} prompts ({rate:.2f} prompts/s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


__all__ = ["COT_TEMPLATE", "GenerateSettings", "generate_data", "read_prompts"]
