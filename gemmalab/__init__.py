"""gemmalab: a Gemma 3 research toolkit. One framework-free core (this package), MLX, PyTorch and JAX backends.

Importing gemmalab imports numpy and no array framework; a backend's framework is imported when it is
first used.
"""

from .api import Cache, Model, backends, init, load
from .config import PRESETS, Gemma3Config, RopeSpec
from .errors import (
    BackendError,
    CheckpointError,
    ConfigError,
    GemmalabError,
    InputError,
    ModelNotFoundError,
    OutputError,
    RunInterrupted,
    TokenizerError,
    TrainingError,
)
from .tokenizer import Tokenizer, format_chat

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "BackendError",
    "Cache",
    "CheckpointError",
    "ConfigError",
    "Gemma3Config",
    "GemmalabError",
    "InputError",
    "Model",
    "ModelNotFoundError",
    "OutputError",
    "RopeSpec",
    "RunInterrupted",
    "Tokenizer",
    "TokenizerError",
    "TrainingError",
    "backends",
    "format_chat",
    "init",
    "load",
]
