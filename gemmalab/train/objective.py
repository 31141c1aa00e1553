"""What a run optimises, beyond the loop's own work: the hook through which objectives other than plain
next-token training (distillation first) reuse the whole training loop -- accumulation, schedules,
precision, checkpoints, resumption, tracking, progress -- instead of copying it.

The loop (gemmalab.train.loop.train) asks its objective, in this order:

1. ``model_source(config)``: the model to train (its config, starting weights, tokenizer);
2. ``start(backend, config, model_config, tokenizer, windows, trained, echo)``: once, before the trainer is
   built, for what the objective needs beside the model (a distillation teacher, built on the same backend;
   a teacher cache, checked against the run's packed ``windows`` and ``trained`` flags);
3. ``train_spec(config)``: what the trainer optimises (the config's own spec, unless the objective knows
   better); ``companions()``: frozen models the loss terms read (gemmalab.train.losses.LossSpec.companions),
   handed to ``backend.trainer(..., companions=...)``; then ``attach(trainer)`` with the trainer built (an
   objective that reports on the loss's own parameters keeps it);
4. ``scalars(step)``: the per-step scalars the loss terms read (a temperature schedule), passed to every
   ``accumulate`` of that step; ``rewrite(backend, trainer, batch, step, micro)``: the micro-batch the
   trainer sees instead of the one drawn (on-policy distillation: the student's own continuations of its
   prompts); ``batch_extras(batch)``: the per-position extra inputs the loss terms read for one batch (a
   teacher cache's sparse targets of the batch's windows); ``step_metrics()``: figures of the step just
   taken, added to its record;
5. ``evaluate(backend, native, stream, config)``: figures added to each evaluation record beside the
   held-out loss (for distillation: teacher perplexity, agreement, KL).

The base class is plain training: the model of ``config.preset`` / ``config.model``, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import checkpoint as hf_checkpoint
from ..api import preset_tokenizer
from ..config import Gemma3Config, resolve_config
from ..errors import ConfigError
from ..tokenizer import Tokenizer


@dataclass
class ModelSource:
    """The model a run trains: its config, its starting weights (None: random init from the seed) and the
    tokenizer its data is read with."""

    config: Gemma3Config
    weights: dict | None
    tokenizer: Tokenizer


def checkpoint_source(model: str, what: str = "training") -> ModelSource:
    """A checkpoint folder or Hub id as a ModelSource, refusing one without a tokenizer."""
    folder = hf_checkpoint.locate(model)
    model_config = hf_checkpoint.load_config(folder)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer is None:
        raise ConfigError(f"{folder} has no tokenizer.json or tokenizer.model: {what} needs one")
    return ModelSource(model_config, hf_checkpoint.read_weights(folder, model_config), tokenizer)


def preset_source(preset: str) -> ModelSource:
    """A preset's shape, randomly initialised later, read with its tokenizer (byte-level for `tiny`)."""
    model_config = resolve_config(preset)
    tokenizer = preset_tokenizer(model_config) or Tokenizer.byte_level()
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(f"preset {preset} has {model_config.vocab_size} ids, fewer than the byte-level 261")
    return ModelSource(model_config, None, tokenizer)


class Objective:
    """Plain next-token training (the default); subclasses override what their objective changes."""

    # The command a resumption hint names.
    command = "gemmalab train"

    def model_source(self, config: Any) -> ModelSource:
        return checkpoint_source(config.model) if config.model is not None else preset_source(config.preset)

    def start(self, backend: Any, config: Any, model_config: Gemma3Config, tokenizer: Tokenizer, windows: Any,
              trained: Any, echo=print) -> None:
        """Prepare what the objective needs beside the model; nothing for plain training."""

    def train_spec(self, config: Any) -> Any:
        return config.train_spec()

    def companions(self) -> dict[str, Any]:
        return {}

    def attach(self, trainer: Any) -> None:
        """The trainer the loop built from ``train_spec`` and ``companions``; plain training keeps nothing."""

    def scalars(self, step: int) -> dict[str, float]:  # noqa: ARG002 (used by subclasses)
        return {}

    def rewrite(self, backend: Any, trainer: Any, batch: Any, step: int, micro: int) -> Any:  # noqa: ARG002
        return batch

    def batch_extras(self, batch: Any) -> dict[str, Any]:  # noqa: ARG002 (used by subclasses)
        return {}

    def step_metrics(self) -> dict[str, float]:
        return {}

    def evaluate(self, backend: Any, native: Any, stream: Any, config: Any) -> dict[str, float]:  # noqa: ARG002
        return {}


__all__ = ["ModelSource", "Objective", "checkpoint_source", "preset_source"]
