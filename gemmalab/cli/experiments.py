"""``gemmalab experiments list | run | menu``: the registry of runnable experiments (gemmalab.experiments).

``run --events`` prints one JSON object per line instead of a progress bar (``{"event": "progress", ...}``,
``"log"``, ``"report"``, ``"error"``): the menu runs experiments in a child process this way, so that a
cancelled or crashed run never takes the menu down with it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import GemmalabError, InputError, OutputError
from .app import command, console, group

experiments_app = group("experiments", "Runnable experiments: list them, run one, or open the menu.")

RUNS_FOLDER = Path("runs") / "experiments"


def default_out(name: str) -> Path:
    """A fresh folder per run, so running an experiment again never touches an earlier report."""
    return RUNS_FOLDER / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_new_out(out: Path) -> Path:
    from ..experiments import REPORT_FILE

    if (out / REPORT_FILE).exists():
        raise OutputError(f"{out} already holds an experiment's {REPORT_FILE}: choose another --out")
    return out


def _figure(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@command("list", on=experiments_app)
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry as JSON.")] = False,
) -> None:
    """List the experiments: name, what each one shows, its expected run time here, its config."""
    from ..experiments import registry

    entries = registry()
    if as_json:
        rows = [
            {
                "name": e.name,
                "summary": e.summary,
                "expected": e.expected,
                "config": str(e.config_path),
                "command": e.command,
            }
            for e in entries.values()
        ]
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="experiments (gemmalab experiments run NAME, or make experiments for the menu)")
    for column in ("name", "what it shows", "expected run time", "config"):
        table.add_column(column, overflow="fold")
    for e in entries.values():
        table.add_row(e.name, e.summary, e.expected, str(e.config_path.relative_to(e.folder.parent)))
    console.print(table)


@command("run", on=experiments_app)
def run_command(
    name: Annotated[str, typer.Argument(help="The experiment (gemmalab experiments list).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for report.json, plots and runs (default: runs/experiments/NAME-TIME).")] = None,  # noqa: UP045
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting of the experiment's config: --set key=value, --set section.key=value (repeatable).")] = None,  # noqa: UP045
    smoke: Annotated[bool, typer.Option("--smoke", help="The smoke run: a few steps that still show the effect (what the tests run).")] = False,
    events: Annotated[bool, typer.Option("--events", help="JSON lines on stdout instead of a progress bar (for the menu and scripts).")] = False,
) -> None:
    """Run one experiment; it writes DIR/report.json with its headline figures, and its plots."""
    from ..experiments import REPORT_FILE, get, run

    experiment = get(name)
    overrides = [f"{k}={json.dumps(v)}" for k, v in experiment.smoke.items()] if smoke else []
    overrides += list(sets or [])
    experiment.settings(overrides)  # a bad --set fails here, before anything is written or said
    target = check_new_out(out if out is not None else default_out(name))
    if events:
        _run_with_events(experiment, target, overrides)
        return
    console.print(f"{experiment.name}: {escape(experiment.summary)}", soft_wrap=True)
    console.print(f"expected: {experiment.expected}; writing {escape(str(target))}", soft_wrap=True)
    report = _run_with_bar(experiment, target, overrides, run)
    _print_report(experiment, report, target / REPORT_FILE)


def _run_with_bar(experiment, target: Path, overrides: list[str], run) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not console.is_terminal:  # a log file: a plain line per phase step, at most every few seconds
        last = {"at": 0.0}

        def plain(phase: str, done: int, total: int, text: str) -> None:
            now = time.monotonic()
            if now - last["at"] >= 5 or done == total:
                last["at"] = now
                console.print(f"{phase} {done}/{total or '?'}  {escape(text)}", soft_wrap=True)

        return run(experiment, target, overrides=overrides, progress=plain, log=_echo)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[text]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int, text: str) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total or None, text="")
            bar.update(tasks[phase], completed=done, total=total or None, text=escape(text))

        return run(
            experiment,
            target,
            overrides=overrides,
            progress=progress,
            log=lambda line: bar.console.print(escape(line), soft_wrap=True),
        )


def _run_with_events(experiment, target: Path, overrides: list[str]) -> None:
    from ..experiments import REPORT_FILE, run

    def emit(event: dict) -> None:
        print(json.dumps(event), flush=True)

    def progress(phase: str, done: int, total: int, text: str) -> None:
        emit({"event": "progress", "phase": phase, "done": done, "total": total, "text": text})

    emit({"event": "start", "experiment": experiment.name, "out": str(target)})
    try:
        report = run(
            experiment,
            target,
            overrides=overrides,
            progress=progress,
            log=lambda line: emit({"event": "log", "line": line}),
        )
    except GemmalabError as err:
        emit({"event": "error", "message": str(err)})
        raise
    emit({"event": "report", "path": str(target / REPORT_FILE), "report": report})


def _print_report(experiment, report: dict, path: Path) -> None:
    table = Table(title=f"{experiment.name}: results")
    table.add_column("figure")
    table.add_column("value", overflow="fold")
    keys = [k for k in experiment.headline if k in report] or [
        k for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    for key in keys:
        table.add_row(key, _figure(report[key]))
    table.add_row("seconds", _figure(report["seconds"]))
    console.print(table)
    console.print(f"report: {escape(str(path))}", soft_wrap=True)


@command("menu", on=experiments_app)
def menu_command() -> None:
    """The interactive menu (make experiments): pick with the arrow keys, read the description and config,
    run with a progress view, see the results at the end."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise InputError(
            "the menu needs a terminal: use `gemmalab experiments list` and `gemmalab experiments run NAME`"
        )
    from ..experiments.menu import ExperimentMenu

    ExperimentMenu().run()


def _echo(message: str) -> None:
    console.print(escape(message), soft_wrap=True)
