"""Running the command line as a user does, and the rules every failing command must keep.

The rules (README, "Command line"): an expected failure prints exactly one line on stderr, starting with
``error:``, naming the problem and the fix; no traceback; a non-zero exit code; and nothing written or
corrupted. ``assert_clean_failure`` checks the first three, ``snapshot`` the last (compare before and after).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def run_cli(*args: str, env: dict | None = None, columns: int = 200, timeout: float | None = 600,
            **kwargs) -> subprocess.CompletedProcess:
    """``gemmalab ARGS`` in a fresh process (a wide terminal by default, so rich does not cut what tests read)."""
    environment = {**os.environ, "COLUMNS": str(columns), **(env or {})}
    return subprocess.run([sys.executable, "-m", "gemmalab", *args], capture_output=True, text=True,
                          env=environment, timeout=timeout, **kwargs)


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str, code: int = 1) -> str:
    """The failure rules; returns the one error line. Each fragment must appear in it."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert result.returncode == code, (result.returncode, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``folder`` with its size and content hash (an empty dict when it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    if folder.is_file():
        return {folder.name: (folder.stat().st_size, hashlib.sha256(folder.read_bytes()).hexdigest())}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def sigkill_when(command: list[str], ready: Callable[[], bool], waiting_for: str, timeout: float = 120) -> None:
    """Run ``command`` and SIGKILL it as soon as ``ready()`` holds (polled every 50 ms): a run killed at a
    chosen point, as a crash or an OOM killer would. Fails when the process ends first or ``timeout`` passes."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, f"the run never reached {waiting_for}"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
