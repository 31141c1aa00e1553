"""``gemmalab distill``: a distillation run, teacher -> student, with everything ``gemmalab train`` has."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..distill.config import DistillConfig
from .app import console, group
from .common import BackendOption, DeviceOption
from .train import (
    BatchSizeFlag,
    CheckpointEveryFlag,
    DataFlag,
    ExtendFlag,
    GradAccumFlag,
    LogEveryFlag,
    LrFlag,
    QuietFlag,
    SeedFlag,
    SeqLenFlag,
    StepsFlag,
    _echo,
    precision_of,
    print_settings,
    run_settings,
)


def _h(name: str) -> str:
    return DistillConfig.meaning(name)


def _list_settings(value: bool) -> None:
    if value:
        print_settings(DistillConfig)


def student_flags(student: str | None) -> dict[str, str | None]:
    """``--student``: a preset name (random init, the teacher's vocabulary and tokenizer) or a checkpoint."""
    if student is None:
        return {}
    from ..config import PRESETS, preset_key

    if preset_key(student) in PRESETS and not Path(student).exists():
        return {"preset": student}
    return {"model": student}


def model_config_of(source: str):
    """A preset's or a checkpoint's config, from its config.json alone (no weights are read)."""
    from .. import checkpoint as hf_checkpoint
    from ..config import PRESETS, preset_key, resolve_config

    if preset_key(source) in PRESETS and not Path(source).exists():
        return resolve_config(source)
    return hf_checkpoint.load_config(hf_checkpoint.locate(source))


def show_mapping(config: DistillConfig, as_json: bool) -> None:
    """The layer mapping of the run's teacher and student: a table, or JSON objects with student_layer,
    student_type, teacher_layer, teacher_type and losses."""
    import json

    from ..distill.config import losses_applied
    from ..distill.mapping import layer_mapping

    if not config.teacher:
        raise typer.BadParameter("--show-mapping needs --teacher (a preset or a checkpoint)")
    student_source = config.model or config.preset
    student, teacher = model_config_of(student_source), model_config_of(config.teacher)
    pairs = layer_mapping(student, teacher, config.mapping)
    applied = losses_applied(config)
    if as_json:
        losses = [] if not config.transfers_features else applied.split(" + ")
        print(json.dumps([{**pair.as_dict(), "losses": losses} for pair in pairs], indent=2))
        return
    from rich.table import Table

    console.print(escape(f"{config.mapping} mapping: {student.name or student_source} ({student.num_hidden_layers} "
                         f"blocks) <- {teacher.name or config.teacher} ({teacher.num_hidden_layers} blocks)"),
                  soft_wrap=True)
    table = Table()
    for column in ("student", "type", "teacher", "type"):
        table.add_column(column, no_wrap=True)
    table.add_column("losses")
    for pair in pairs:
        row = pair.as_dict()
        table.add_row(str(row["student_layer"]), row["student_type"], str(row["teacher_layer"]), row["teacher_type"],
                      applied)
    console.print(table)
    if student.hidden_size != teacher.hidden_size and config.hidden_weight > 0:
        console.print(f"hidden states are projected {student.hidden_size} -> {teacher.hidden_size} by a learned "
                      "matrix per pair (kept with the run, not in the student)")


def distill(
    ctx: typer.Context,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help=_h("teacher"))] = None,  # noqa: UP045
    cache: Annotated[Optional[str], typer.Option("--cache", help=_h("cache"))] = None,  # noqa: UP045
    student: Annotated[Optional[str], typer.Option("--student", help="The student: a preset (random init, taking the teacher's vocabulary and tokenizer) or a checkpoint folder / Hub id (default: preset tiny).")] = None,  # noqa: UP045
    config_file: Annotated[Optional[Path], typer.Option("--config", help="A YAML file of settings, flat or in teacher / student / training / distillation sections (keys: --list-settings).")] = None,  # noqa: UP045
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="Override any setting: --set key=value or --set section.key=value (repeatable).")] = None,  # noqa: UP045
    list_settings: Annotated[bool, typer.Option("--list-settings", callback=_list_settings, is_eager=True, help="List every setting with its type, default and meaning, and exit.")] = False,
    loss: Annotated[Optional[str], typer.Option("--loss", help=_h("loss"))] = None,  # noqa: UP045
    alpha: Annotated[Optional[float], typer.Option("--alpha", help=_h("alpha"))] = None,  # noqa: UP045
    beta: Annotated[Optional[float], typer.Option("--beta", help=_h("beta"))] = None,  # noqa: UP045
    temperature: Annotated[Optional[float], typer.Option("--temperature", help=_h("temperature"))] = None,  # noqa: UP045
    teacher_dtype: Annotated[Optional[str], typer.Option("--teacher-dtype", help=_h("teacher_dtype"))] = None,  # noqa: UP045
    mapping: Annotated[Optional[str], typer.Option("--mapping", help=_h("mapping"))] = None,  # noqa: UP045
    hidden_weight: Annotated[Optional[float], typer.Option("--hidden-weight", help=_h("hidden_weight"))] = None,  # noqa: UP045
    hidden_loss: Annotated[Optional[str], typer.Option("--hidden-loss", help=_h("hidden_loss"))] = None,  # noqa: UP045
    attention_weight: Annotated[Optional[float], typer.Option("--attention-weight", help=_h("attention_weight"))] = None,  # noqa: UP045
    attention_temperature: Annotated[Optional[float], typer.Option("--attention-temperature", help=_h("attention_temperature"))] = None,  # noqa: UP045
    lmbda: Annotated[Optional[float], typer.Option("--lmbda", help=_h("lmbda"))] = None,  # noqa: UP045
    seq_kd: Annotated[Optional[bool], typer.Option("--seq-kd/--no-seq-kd", help=_h("seq_kd"))] = None,  # noqa: UP045
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help=_h("max_new_tokens"))] = None,  # noqa: UP045
    show: Annotated[bool, typer.Option("--show-mapping", help="Print the layer mapping of --teacher and --student (presets or checkpoints; no weights are read) with the losses on each pair, and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --show-mapping: print JSON for machines.")] = False,
    lora: Annotated[Optional[str], typer.Option("--lora", help="Train a LoRA / DoRA adapter on the student checkpoint instead of the student: rank=16,alpha=32,targets=q_proj,v_proj (gemmalab train --lora).")] = None,  # noqa: UP045
    data: DataFlag = None,
    steps: StepsFlag = None,
    batch_size: BatchSizeFlag = None,
    grad_accum: GradAccumFlag = None,
    seq_len: SeqLenFlag = None,
    lr: LrFlag = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="The student's compute dtype: float32, bfloat16 or float16 (master weights stay float32) (default: float32)")] = None,  # noqa: UP045
    backend: BackendOption = None,
    device: DeviceOption = None,
    seed: SeedFlag = None,
    out: Annotated[Optional[str], typer.Option(help=_h("out"))] = None,  # noqa: UP045
    checkpoint_every: CheckpointEveryFlag = None,
    log_every: LogEveryFlag = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint, with its own settings (its teacher and objective cannot change).")] = False,
    extend: ExtendFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Distil a teacher into a student: loss = alpha * cross-entropy + (1 - alpha) * divergence(teacher || student)
    at temperature T, both output heads inside the chunked loss (no [batch, tokens, vocab] logits); optionally
    hidden-state and attention-map transfer on mapped layer pairs (--hidden-weight, --attention-weight,
    --mapping; --show-mapping prints the pairs), and on-policy or sequence-level batches (--lmbda, --seq-kd).

    Writes OUT/metrics.jsonl (each loss component; at each evaluation the student's and teacher's held-out perplexity, top-1 agreement and KL), OUT/report.json and OUT/curves.png. Ctrl-C stops after the step in progress and keeps a checkpoint to resume from.
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..distill import distill as run_distillation
    from ..dtypes import canonical_dtype

    precision = precision_of(dtype)
    flags = {
        "teacher": teacher, "cache": cache, "teacher_dtype": canonical_dtype(teacher_dtype) if teacher_dtype else None,
        "loss": loss, "alpha": alpha, "beta": beta, "temperature": temperature, "mapping": mapping,
        "hidden_weight": hidden_weight, "hidden_loss": hidden_loss, "attention_weight": attention_weight,
        "attention_temperature": attention_temperature, "lmbda": lmbda, "seq_kd": seq_kd,
        "max_new_tokens": max_new_tokens, "lora": lora,
        "data": data, "steps": steps, "batch_size": batch_size, "grad_accum": grad_accum, "seq_len": seq_len,
        "lr": lr, "precision": precision, "backend": backend, "device": device, "seed": seed, "out": out,
        "checkpoint_every": checkpoint_every, "log_every": log_every, "resume": resume or None,
        "extend": extend or None, **student_flags(student),
    }
    config = run_settings(DistillConfig, config_file, sets, flags)
    if flags.get("preset") and config.model is not None:  # --student PRESET wins over a configured checkpoint
        config = dataclasses.replace(config, model=None)
    if show:
        show_mapping(config, as_json)
        return
    who = config.model or f"preset {config.preset} (random init)"
    console.print(f"distilling {escape(config.teacher or 'the teacher cache ' + config.cache)} -> {escape(who)} ({config.loss}, alpha {config.alpha}, "
                  f"T {config.temperature}) for {config.steps} steps -> {escape(config.out)}", soft_wrap=True)
    result = run_distillation(config, progress=not quiet and console.is_terminal, echo=_echo,
                              log_lines=not quiet and not console.is_terminal)
    report = result.report
    shown = ", ".join(f"{key} {report[key]:.4g}" for key in ("student_perplexity", "teacher_perplexity",
                                                             "top1_agreement", "kl") if report.get(key) is not None)
    console.print(f"done: step {result.train.steps}" + (f", held out: {shown}" if shown else ""))
    console.print(f"checkpoint: {escape(str(result.train.checkpoint))}", soft_wrap=True)
    console.print(f"report: {escape(str(result.report_path))}", soft_wrap=True)


distill_app = group("distill", "Distil a teacher into a student (run `gemmalab distill --help` for the options).", run=distill)
