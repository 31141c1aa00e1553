"""Runnable experiments: the registry over the repository's ``experiments/`` folder (``registry``), the
reports they write, and the interactive menu (``menu``, imported only when it opens)."""

from .registry import REPORT_FILE, Experiment, experiments_folder, get, registry, run

__all__ = ["REPORT_FILE", "Experiment", "experiments_folder", "get", "registry", "run"]
