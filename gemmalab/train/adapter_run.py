"""A LoRA or DoRA run (``gemmalab train --lora ...``): the adapter is trained, the model it wraps is not.

* with ``quantize`` (QLoRA) the frozen model's block linears are held quantized (int4 or int8, the ``quantized``
  wrapper) and the adapter wraps those;
* the adapter starts fresh (gemmalab.lora.fresh_adapter, from the run's seed) or, on ``--resume``, from the
  checkpoint, which holds the adapter in PEFT's format (gemmalab.adapters) instead of the model;
* every parameter but the adapter's has learning-rate scale 0 (frozen: no gradient, no optimizer state), and
  an adapter parameter takes the scale its linear's weight would have (layer-wise decay, unfreezing);
* checkpoints hold the adapter and its optimizer state only (gemmalab.train.checkpoints).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Gemma3Config
from ..errors import CheckpointError
from ..linears import select
from ..lora import Adapter, LoraConfig, adapter_parameter_names, fresh_adapter, wrap_adapter


def start_adapter(backend: Any, native: Any, model: Gemma3Config, settings: LoraConfig, *, seed: int,
                  base_weights: Mapping[str, np.ndarray], resume_from: Path | None) -> list[str]:
    """Wrap the run's model with its adapter (fresh, or the checkpoint's on resume); returns the linears."""
    if resume_from is None:
        adapter = fresh_adapter(settings, model, seed, base_weights)
    else:
        from ..adapters import read_peft

        saved = read_peft(resume_from)
        # PEFT's file may name the linears in another (equivalent) way: compare what is adapted, and how
        same = (sorted(saved.tensors) == sorted(settings.linears(model))
                and (saved.config.rank, saved.config.scale, saved.config.dora) == (settings.rank, settings.scale,
                                                                                   settings.dora))
        if not same:
            raise CheckpointError(f"{resume_from} holds a {saved.config.describe()} adapter, but the run trains "
                                  f"{settings.describe()}: resume with the run's own settings")
        adapter = Adapter(settings, saved.tensors)
    return wrap_adapter(backend, native, model, adapter)


def quantize_base(backend: Any, native: Any, model: Gemma3Config, bits: int, group_size: int) -> list[str]:
    """Replace every block linear of the frozen model by its quantized form (the ``quantized`` wrapper: the
    numbers of gemmalab.quantize, each backend's kernel), before the adapter wraps them (QLoRA). The head
    stays as it is."""
    names = select(model, layers=range(model.num_hidden_layers))
    return backend.wrap(native, names, "quantized", bits=bits, group_size=group_size)


def adapter_lr_scales(scales: Mapping[str, float], parameters: Collection[str], settings: LoraConfig,
                      adapted: Collection[str]) -> dict[str, float]:
    """The learning-rate scale of every parameter the model holds: 0 but for the adapter's, which take the
    scale of their linear's canonical weight in ``scales`` (gemmalab.train.layers.lr_scales)."""
    out = dict.fromkeys(parameters, 0.0)
    for name in adapter_parameter_names(settings, adapted):
        out[name] = float(scales.get(name.rpartition(".")[0] + ".weight", 1.0))
    return out


__all__ = ["adapter_lr_scales", "quantize_base", "start_adapter"]
