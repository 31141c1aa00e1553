"""The command line, run as a user runs it: in a fresh process, reading its output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest


def gemmalab(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gemmalab", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "gemmalab"
    if not script.exists():
        pytest.skip("gemmalab is not pip-installed in this interpreter (run through ./setup.sh)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("gemmalab ")


def test_importing_the_cli_imports_no_framework():
    code = "import sys, gemmalab, gemmalab.cli; print([m for m in ('torch', 'mlx', 'jax') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_check_lists_the_backends_setup_installs_and_they_are_exact():
    result = gemmalab("check", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    usable = {b["name"]: b for b in report["backends"] if b["usable"]}
    # setup.sh installs MLX and PyTorch on Linux and on Apple Silicon: check must find both, exact.
    if platform.system() == "Linux" or (platform.system() == "Darwin" and platform.machine() == "arm64"):
        assert {"mlx", "torch"} <= set(usable), report["backends"]
    for backend in usable.values():
        assert backend["version"] and backend["devices"]
        assert backend["reference_rel_error"] < 1e-5
    assert report["memory"]["total"] > 0


def test_check_table_for_people():
    result = gemmalab("check", "--no-verify")
    assert result.returncode == 0
    assert "backends" in result.stdout and "torch" in result.stdout


def test_download_offline_is_one_clear_line(tmp_path):
    result = gemmalab("download", "someone/absent-model", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: model 'someone/absent-model' is not in the Hugging Face cache and offline mode is on "
        "(HF_HUB_OFFLINE=1): run `gemmalab download someone/absent-model` where the network reaches the Hub, "
        "or pass a local checkpoint folder"
    ]


def test_unknown_backend_is_one_clear_line(tiny_hf):
    code = "import gemmalab; gemmalab.init('tiny', backend='tensorflow')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "BackendError: unknown backend 'tensorflow': choose one of auto, mlx, torch" in result.stderr
