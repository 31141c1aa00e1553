"""The ``gemmalab`` command line (typer + rich), one module per group of commands:

    app.py       the typer app and the failure policy every command shares (one line, exit code)
    common.py    options and helpers several commands use (backend/dtype/device, opening a model source)
    models.py    check, info, convert, download
    generate.py  generate
    bench.py     bench
    train.py     train, eval
    distill.py   distill (training)
    distill_cache.py  distill cache
    distill_generate.py  distill generate
    experiments.py  experiments list, run, menu
    lora.py      lora export, lora merge (adapter formats)

Importing this package imports no array framework: each command imports its backend when it runs.
"""

from __future__ import annotations

from . import bench, distill, distill_cache, distill_generate, experiments, generate, lora, models, train  # noqa: F401  (each module registers its commands on `app`)
from .app import app, console, err_console, main

__all__ = ["app", "console", "err_console", "main"]
