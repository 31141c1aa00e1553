"""Training checkpoints: written atomically, kept last-N, found again by ``--resume``.

A checkpoint is one folder ``RUN/checkpoints/step-00000060/`` holding

* the model as an ordinary Hugging Face checkpoint (``model.safetensors``, ``config.json``,
  ``generation_config.json``, the tokenizer), so ``gemmalab.load`` and transformers read it directly; in a
  LoRA run instead the adapter alone, in PEFT's format (``adapter_config.json``,
  ``adapter_model.safetensors``), which PEFT and ``gemmalab.load(BASE, adapter=...)`` read;
* ``optimizer/state.safetensors``: the optimizer state, in the names of gemmalab/train/spec.py (the same
  for every backend, so any backend can resume it);
* ``loss/parameters.safetensors``, when the loss has trainable parameters of its own (the projections of a
  hidden-state transfer, gemmalab.train.transfer): they belong to the run, not to the model, so they are
  kept apart from its checkpoint (gemmalab.load and transformers never see them);
* ``trainer_state.json``: the step, the data position, the loss scale, the backend that wrote the
  checkpoint, the run's configuration.

The folder is assembled under a temporary name and renamed into place in one step, and
``trainer_state.json`` is written last: a run killed at any moment leaves either a whole checkpoint or none
(a leftover temporary folder is removed on the next save). Only complete checkpoints are ever resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from ..checkpoint import atomic_save_safetensors, atomic_write_json, save_checkpoint
from ..config import Gemma3Config
from ..errors import CheckpointError
from ..lora import Adapter
from ..tokenizer import Tokenizer

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer/state.safetensors"  # in a subfolder: the model reader owns *.safetensors
LOSS_PARAMETERS_FILE = "loss/parameters.safetensors"
PREFIX = "step-"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    run_dir: Path,
    step: int,
    *,
    config: Gemma3Config,
    weights: Mapping[str, np.ndarray] | None = None,
    optimizer_state: Mapping[str, np.ndarray],
    state: dict,
    tokenizer: Tokenizer | None,
    keep_last: int,
    loss_parameters: Mapping[str, np.ndarray] | None = None,
    adapter: Adapter | None = None,
    base: str | None = None,
) -> Path:
    """Write the checkpoint of ``step`` and delete all but the newest ``keep_last`` complete ones;
    ``loss_parameters`` (the loss's own trainable parameters) go beside the model, not into it. A LoRA run
    gives its ``adapter`` (and the ``base`` model it adapts) instead of ``weights``: the checkpoint is then a
    PEFT adapter folder (gemmalab.adapters), with no copy of the frozen model."""
    if (weights is None) == (adapter is None):
        raise ValueError("a checkpoint holds the model's weights or an adapter: give exactly one")
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    staging = root / f".tmp-{PREFIX}{step:08d}"
    for leftover in root.glob(f".tmp-{PREFIX}*"):  # a save interrupted by a kill
        shutil.rmtree(leftover, ignore_errors=True)
    if adapter is not None:
        from ..adapters import write_peft

        write_peft(adapter, staging, base_model_name_or_path=base)
    else:
        save_checkpoint(staging, config.with_dtype("float32"), weights)  # master weights, exactly as trained
    if tokenizer is not None:
        tokenizer.save(staging)
    (staging / OPTIMIZER_FILE).parent.mkdir()
    atomic_save_safetensors(staging / OPTIMIZER_FILE, dict(optimizer_state))
    if loss_parameters:
        (staging / LOSS_PARAMETERS_FILE).parent.mkdir()
        atomic_save_safetensors(staging / LOSS_PARAMETERS_FILE, dict(loss_parameters))
    atomic_write_json(staging / STATE_FILE, {"step": step, **state})
    if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(root)
    for old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder / STATE_FILE} is unreadable ({err}): delete that checkpoint folder") from None


def read_optimizer_state(folder: Path) -> dict[str, np.ndarray]:
    path = folder / OPTIMIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this checkpoint cannot be resumed; delete its folder")
    return load_file(str(path))


def read_loss_parameters(folder: Path) -> dict[str, np.ndarray]:
    """The loss parameters a checkpoint holds ({} when its loss had none)."""
    path = folder / LOSS_PARAMETERS_FILE
    return load_file(str(path)) if path.is_file() else {}


__all__ = ["LOSS_PARAMETERS_FILE", "OPTIMIZER_FILE", "checkpoint_dir", "read_loss_parameters", "complete_checkpoints", "latest", "read_optimizer_state", "read_state", "save"]
