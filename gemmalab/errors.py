"""One hierarchy of gemmalab errors.

Every message names the thing that is wrong (a file, a key, a config field) and what to do about it, in
one line. The CLI prints ``str(error)`` and exits non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations


class GemmalabError(Exception):
    """Base of every expected gemmalab failure."""


class ConfigError(GemmalabError):
    """A model configuration (config.json, preset name, field value) is missing or invalid."""


class CheckpointError(GemmalabError):
    """Weights are missing, unreadable, of the wrong shape, or do not match the configuration."""


class ModelNotFoundError(CheckpointError):
    """The model source is neither a local folder, a cached repository nor reachable on the Hub."""


class BackendError(GemmalabError):
    """A backend is unknown, not installed, or cannot do what was asked."""


class TokenizerError(GemmalabError):
    """A tokenizer file is missing or unreadable."""


class InputError(GemmalabError):
    """Arguments passed to a gemmalab function are of the wrong type, shape or range."""


class TrainingError(GemmalabError):
    """A run that cannot go on (non-finite loss, a checkpoint that does not fit the run)."""


class OutputError(GemmalabError, OSError):
    """A file or folder cannot be written where it was asked for (read-only, a file in the way, disk full).

    It is also an OSError, so code that catches OSError around a save keeps working."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C, after keeping what it could. Its message says what was kept (the
    checkpoint) and how to go on; it is a KeyboardInterrupt, so code that handles Ctrl-C still does."""
