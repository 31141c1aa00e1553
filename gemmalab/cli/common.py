"""What several commands share: the backend/dtype/device options, and opening a model source."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import InputError

BackendOption = Annotated[
    Optional[str],  # noqa: UP045  (typer reads the annotation at run time)
    typer.Option("--backend", "-b", help="mlx, torch, jax or auto (default: $GEMMALAB_BACKEND, else auto)."),
]
DtypeOption = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)."),
]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="cuda:0, mps, gpu, cpu ... (default: the best)")]  # noqa: UP045


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 1024**3:.2f} GiB"


def is_preset(source: str) -> bool:
    """A preset name (gemma-3-270m, 270m, tiny, ...) that is not also a local path."""
    from ..config import PRESETS, preset_key

    return preset_key(source) in PRESETS and not Path(source).exists() and "/" not in source


@dataclass(frozen=True)
class Source:
    """A model source resolved without building anything: its config, its tokenizer (or None), and where
    it is (a checkpoint folder, or None for a preset with random weights)."""

    name: str
    config: Any
    tokenizer: Any
    folder: Path | None


def resolve_source(source: str) -> Source:
    """Config and tokenizer of a preset, a checkpoint folder or a Hub repo id, before any weights are read,
    so a command can refuse what the model cannot do (text without a tokenizer, say) in a second, not
    after a long build."""
    from .. import checkpoint
    from ..api import preset_tokenizer
    from ..config import Gemma3Config
    from ..tokenizer import Tokenizer

    if is_preset(source):
        config = Gemma3Config.preset(source)
        return Source(source, config, preset_tokenizer(config), None)
    folder = checkpoint.locate(source)
    return Source(source, checkpoint.load_config(folder), Tokenizer.from_folder(folder), folder)


def open_model(source: Source | str, backend: str | None, dtype: str | None, device: str | None, seed: int = 0,
               adapter: str | None = None):
    """The model of ``source``: a checkpoint's weights, or a preset's random ones drawn from ``seed``; with
    ``adapter`` (a PEFT or mlx-lm adapter folder, or a LoRA run's checkpoint) attached."""
    import gemmalab

    resolved = source if isinstance(source, Source) else resolve_source(source)
    if resolved.folder is None:
        if adapter is not None:
            raise InputError(f"an adapter adapts a trained model, not {resolved.name}'s random weights: give the "
                             "checkpoint it was trained on")
        return gemmalab.init(resolved.name, backend=backend, dtype=dtype, device=device, seed=seed)
    return gemmalab.load(resolved.folder, backend=backend, dtype=dtype, device=device, adapter=adapter)
