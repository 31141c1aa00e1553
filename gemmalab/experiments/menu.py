"""The interactive menu over the experiment registry (``make experiments``), built on Textual.

Left, the experiments; right, the highlighted one's description, expected run time, launch command and
config. Enter runs it (with any ``key=value`` overrides typed in the settings line) in a child process,
``gemmalab experiments run NAME --events``, whose JSON lines drive the progress bar and the log; the
headline figures of its report show when it ends. A child process keeps the menu alive whatever the run
does, and lets ``c`` cancel it the way Ctrl-C would (a training run keeps a checkpoint).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
from pathlib import Path

from rich.markup import escape
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import (
    Footer,
    Header,
    Input,
    Label,
    ListItem,
    ListView,
    ProgressBar,
    RichLog,
    Static,
    TextArea,
)

from .registry import Experiment, registry


def _figure(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ExperimentMenu(App):
    """Pick an experiment, read it, run it, read its results."""

    TITLE = "gemmalab experiments"
    CSS = """
    #entries { width: 30; border: round $accent; }
    #details { width: 1fr; }
    #about { height: auto; padding: 0 1; }
    #config { height: 1fr; min-height: 6; }
    #sets { margin: 0 0; }
    #status { height: auto; padding: 0 1; }
    #log { height: 8; border: round $panel; }
    #results { height: auto; padding: 0 1; }
    """
    BINDINGS = [
        Binding("r", "run", "run (or Enter)"),
        Binding("c", "cancel", "cancel run"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(
        self, *, folder: Path | None = None, extra_sets: list[str] | None = None, out_root: Path | None = None
    ) -> None:
        super().__init__()
        self.entries: dict[str, Experiment] = registry(folder)
        self.folder = folder
        self.extra_sets = list(extra_sets or [])  # always applied (the tests use the smoke settings)
        self.out_root = out_root
        self.process: asyncio.subprocess.Process | None = None
        self.last_report: dict | None = None
        self.last_error: str | None = None

    # -- layout -------------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            yield ListView(*(ListItem(Label(name), name=name) for name in self.entries), id="entries")
            with Vertical(id="details"):
                yield Static(id="about")
                yield TextArea("", language=None, read_only=True, soft_wrap=False, id="config")
                yield Input(
                    placeholder="settings to override: key=value key=value ... (then Enter)", id="sets"
                )
                yield Static("Enter runs the highlighted experiment.", id="status")
                yield ProgressBar(total=None, show_eta=True, id="bar")
                yield Static(id="results")
                yield RichLog(id="log", wrap=True, markup=False)
        yield Footer()

    def on_mount(self) -> None:
        if self.entries:
            self.show(next(iter(self.entries)))
        self.query_one("#entries", ListView).focus()

    @property
    def highlighted(self) -> Experiment | None:
        item = self.query_one("#entries", ListView).highlighted_child
        return self.entries.get(item.name) if item is not None else None

    def show(self, name: str) -> None:
        e = self.entries[name]
        self.query_one("#about", Static).update(
            f"[b]{escape(e.name)}[/b]: {escape(e.summary)}\nexpected: {escape(e.expected)}\n"
            f"command: {escape(e.command)}\nconfig: {escape(str(e.config_path))}"
        )
        self.query_one("#config", TextArea).load_text(e.config_text())

    @on(ListView.Highlighted, "#entries")
    def _highlighted(self, event: ListView.Highlighted) -> None:
        if event.item is not None:
            self.show(event.item.name)

    @on(ListView.Selected, "#entries")
    def _selected(self) -> None:
        self.action_run()

    @on(Input.Submitted, "#sets")
    def _sets_submitted(self) -> None:
        self.action_run()

    # -- running ------------------------------------------------------------------------------------------
    def action_run(self) -> None:
        experiment = self.highlighted
        if experiment is None:
            return
        if self.process is not None:
            self.notify("a run is in progress: wait for it, or press c to cancel it", severity="warning")
            return
        try:
            typed = shlex.split(self.query_one("#sets", Input).value)
        except ValueError as err:
            self.query_one("#status", Static).update(f"[red]settings: {escape(str(err))}[/red]")
            return
        self.launch(experiment, self.extra_sets + typed)

    def command_for(self, experiment: Experiment, sets: list[str]) -> list[str]:
        argv = [sys.executable, "-m", "gemmalab", "experiments", "run", experiment.name, "--events"]
        if self.out_root is not None:
            from ..cli.experiments import default_out

            argv += ["--out", str(self.out_root / default_out(experiment.name).name)]
        for item in sets:
            argv += ["--set", item]
        return argv

    @work(exclusive=True)
    async def launch(self, experiment: Experiment, sets: list[str]) -> None:
        status, bar, log = (
            self.query_one("#status", Static),
            self.query_one("#bar", ProgressBar),
            self.query_one("#log", RichLog),
        )
        results = self.query_one("#results", Static)
        results.update("")
        log.clear()
        bar.update(total=None, progress=0)
        self.last_report, self.last_error = None, None
        status.update(
            f"running [b]{escape(experiment.name)}[/b] ({escape(experiment.expected)}) ... c cancels"
        )
        env = dict(os.environ)
        if self.folder is not None:
            env["GEMMALAB_EXPERIMENTS"] = str(self.folder)
        self.process = await asyncio.create_subprocess_exec(
            *self.command_for(experiment, sets),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict) or "event" not in event:
                if line:
                    log.write(line)  # warnings and errors of the child arrive as plain lines
                if line.startswith("error: "):  # the CLI's one failure line (e.g. a bad setting)
                    self.last_error = line.removeprefix("error: ")
                continue
            self.take(event, experiment)
        code = await self.process.wait()
        self.process = None
        if self.last_report is not None:
            status.update(f"[green]{escape(experiment.name)} done[/green] in {self.last_report['seconds']} s")
        elif code == 130 or code == -signal.SIGINT:
            status.update(f"[yellow]{escape(experiment.name)} cancelled[/yellow]")
        else:
            self.last_error = self.last_error or f"the run exited with code {code}"
            status.update(f"[red]{escape(experiment.name)} failed: {escape(self.last_error)}[/red]")

    def take(self, event: dict, experiment: Experiment) -> None:
        """One JSON event of the child process."""
        kind = event["event"]
        if kind == "progress":
            bar = self.query_one("#bar", ProgressBar)
            bar.update(total=event["total"] or None, progress=event["done"])
            self.query_one("#status", Static).update(
                f"running [b]{escape(experiment.name)}[/b]: {escape(event['phase'])} "
                f"{event['done']}/{event['total'] or '?'}  {escape(event['text'])}"
            )
        elif kind in ("log", "start"):
            self.query_one("#log", RichLog).write(event.get("line") or f"writing {event.get('out')}")
        elif kind == "error":
            self.last_error = event["message"]
            self.query_one("#log", RichLog).write(f"error: {event['message']}")
        elif kind == "report":
            self.last_report = event["report"]
            self.query_one("#results", Static).update(
                self.results_text(experiment, event["report"], event["path"])
            )

    @staticmethod
    def results_text(experiment: Experiment, report: dict, path: str) -> str:
        keys = [k for k in experiment.headline if k in report] or [
            k for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        lines = [f"[b]results[/b] ({escape(path)})"]
        lines += [f"  {escape(k)}: {escape(_figure(report[k]))}" for k in keys]
        return "\n".join(lines)

    def action_cancel(self) -> None:
        if self.process is None:
            self.notify("nothing is running")
            return
        # The child's own Ctrl-C handling: a training run finishes its step and keeps a checkpoint.
        os.killpg(self.process.pid, signal.SIGINT)
        self.query_one("#status", Static).update("cancelling: the run stops after its current step ...")

    async def action_quit(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGINT)
            await self.process.wait()
        self.exit()


__all__ = ["ExperimentMenu"]
