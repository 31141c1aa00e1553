"""The registry of runnable experiments: what each one is, where its config lives, and how to run it.

An experiment is a thin Python file in the repository's ``experiments/`` folder that defines ``EXPERIMENT``
(an ``Experiment``) over the library, and a YAML config in ``experiments/configs/`` whose top lines show its
launch command. ``run`` reads the config, applies ``--set key=value`` overrides (``section.key=value`` inside a
section), runs the experiment with a progress callback and writes ``DIR/report.json``: the experiment's
headline figures, the settings it ran with, and how long it took. ``gemmalab experiments`` and the
``make experiments`` menu are the two ways in; both end here.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..checkpoint import atomic_write_json
from ..errors import ConfigError, InputError
from ..outputs import check_writable_folder, writing
from ..train.config import read_yaml_mapping

# Where the registry is read from: the repository's experiments/ folder, or another one named here.
ENV_VAR = "GEMMALAB_EXPERIMENTS"
REPORT_FILE = "report.json"

# progress(phase, done, total, text): a runner calls it as work advances (total 0 = unknown length).
ProgressFn = Callable[[str, int, int, str], None]
# log(line): a runner's free-text lines (what it is doing, a note on a setting).
LogFn = Callable[[str], None]


@dataclass(frozen=True)
class Experiment:
    """One runnable experiment. ``run(settings, out, progress, log)`` does the work in folder ``out`` and
    returns the headline figures (a JSON-able dict); the registry adds the settings and timings around them.
    ``smoke`` holds the overrides of a smoke run: a few steps that still show the real effect (the tests
    run it)."""

    name: str
    summary: str  # one line on what it shows
    config: str  # its YAML, relative to the experiments folder
    expected: str  # its expected run time here, e.g. "about 1 minute on PyTorch (2 CPU cores)"
    run: Callable[[dict[str, Any], Path, ProgressFn, LogFn], dict[str, Any]]
    headline: tuple[str, ...] = ()  # the report keys a summary shows first
    smoke: Mapping[str, Any] = field(default_factory=dict)
    folder: Path = Path(".")  # set by the registry: the experiments folder it came from

    @property
    def config_path(self) -> Path:
        return self.folder / self.config

    @property
    def command(self) -> str:
        """The launch command, as the config's header shows it."""
        return f"gemmalab experiments run {self.name}"

    def settings(self, overrides: list[str] | None = None) -> dict[str, Any]:
        """The config's settings with ``key=value`` overrides applied (YAML values; ``a.b=v`` in a section)."""
        return apply_overrides(read_config(self.config_path), overrides or [])

    def config_text(self) -> str:
        return self.config_path.read_text(encoding="utf-8")


def experiments_folder() -> Path:
    """The folder the registry reads: $GEMMALAB_EXPERIMENTS, else the repository's experiments/."""
    named = os.environ.get(ENV_VAR)
    folder = Path(named).expanduser() if named else Path(__file__).resolve().parents[2] / "experiments"
    if not folder.is_dir():
        raise ConfigError(
            f"no experiments folder at {folder}: run from a clone of gemmalab, or set {ENV_VAR} to the folder"
        )
    return folder


def registry(folder: Path | None = None) -> dict[str, Experiment]:
    """Every experiment of ``folder`` (default ``experiments_folder()``) by name, in file-name order."""
    folder = folder or experiments_folder()
    found: dict[str, Experiment] = {}
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"gemmalab_experiment_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        entry = getattr(module, "EXPERIMENT", None)
        if not isinstance(entry, Experiment):
            continue  # a helper module beside the entries
        if entry.name in found:
            raise ConfigError(f"two experiments are named {entry.name!r} in {folder}: rename one")
        found[entry.name] = Experiment(**{**entry.__dict__, "folder": folder})
    return found


def get(name: str, folder: Path | None = None) -> Experiment:
    entries = registry(folder)
    if name not in entries:
        import difflib

        close = difflib.get_close_matches(name, entries, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise InputError(f"no experiment named {name!r}{hint}: `gemmalab experiments list` shows them")
    return entries[name]


def read_config(path: Path) -> dict[str, Any]:
    """An experiment's YAML settings (one ConfigError line for a missing or malformed file)."""
    return read_yaml_mapping(path)


def apply_overrides(settings: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``settings`` with each ``key=value`` applied (value read as YAML). A dotted key sets a key inside a
    section; a key the config does not have is refused with the known keys, so a typo never runs silently."""
    result = _copy(settings)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not key=value: write e.g. --set steps=20")
        *sections, last = key.strip().split(".")
        node = result
        for depth, section in enumerate(sections):
            if not isinstance(node.get(section), dict):
                raise ConfigError(
                    f"--set {key}: {'.'.join(sections[: depth + 1])} is not a section of this config"
                )
            node = node[section]
        if last not in node:
            known = ", ".join(sorted(node))
            raise ConfigError(f"--set {key}: no such setting here (known: {known})")
        node[last] = yaml.safe_load(raw) if raw.strip() else None
    return result


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def run(
    experiment: Experiment,
    out: Path,
    *,
    overrides: list[str] | None = None,
    progress: ProgressFn | None = None,
    log: LogFn | None = None,
) -> dict[str, Any]:
    """Run ``experiment`` in folder ``out`` and write ``out/report.json``; returns the report."""
    settings = experiment.settings(overrides)
    out = check_writable_folder(out, what="experiment folder", fix="choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    started, clock = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    figures = experiment.run(settings, out, progress or _quiet_progress, log or _quiet_log)
    report = {
        "experiment": experiment.name,
        "summary": experiment.summary,
        **figures,
        "settings": settings,
        "overrides": list(overrides or []),
        "started": started,
        "seconds": round(time.perf_counter() - clock, 1),
    }
    with writing(out / REPORT_FILE, "report"):
        atomic_write_json(out / REPORT_FILE, report)
    return report


def _quiet_progress(phase: str, done: int, total: int, text: str) -> None:  # noqa: ARG001
    return None


def _quiet_log(line: str) -> None:  # noqa: ARG001
    return None


__all__ = [
    "ENV_VAR",
    "REPORT_FILE",
    "Experiment",
    "LogFn",
    "ProgressFn",
    "apply_overrides",
    "experiments_folder",
    "get",
    "read_config",
    "registry",
    "run",
]
