"""Writing where the user asked: one check of an output folder before any work starts, and operating-system
errors during a write turned into one-line gemmalab errors that name the path.

Permission bits alone do not say whether a folder is writable (root ignores them; a read-only mount or an
immutable folder refuses root too), so the check creates and removes a probe, which leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def check_writable_folder(folder: str | os.PathLike, *, what: str = "output folder", fix: str = "choose another folder") -> Path:
    """``folder`` as a Path, once it is certain the folder exists or can be created, and can be written.

    Raises OutputError naming ``what`` and the path, with ``fix``; nothing is created."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder: {fix}")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise OutputError(f"{what} {path} cannot be created: {existing} is a file, not a folder: {fix}")
    try:
        probe = tempfile.mkdtemp(prefix=".gemmalab-write-probe-", dir=existing)
        os.rmdir(probe)
    except OSError as err:
        raise OutputError(f"{what} {path} is not writable ({existing}: {err.strerror}): {fix}") from None
    return path


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "file") -> Iterator[None]:
    """Turn an OSError raised while writing ``path`` into an OutputError that names it."""
    try:
        yield
    except OutputError:
        raise
    except OSError as err:
        where = err.filename or path
        raise OutputError(f"cannot write {what} {where}: {err.strerror or err}: free space or choose another folder") from None


__all__ = ["check_writable_folder", "writing"]
