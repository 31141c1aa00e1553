"""Stages of a partial model: which parameters each piece of a forward pass needs resident.

A layer-streamed model (gemmalab.streaming) is built with ``partial=True`` (Backend.build): only the
parameters of the stage it is about to run are loaded, the others stay shape-only (no memory). A forward
pass then goes stage by stage through the backend's ``run_layers`` (the scaled embedding when given ids,
then a range of decoder blocks) and ``head_chunks`` (the final norm, the output head and the soft-cap).
This module names what each stage reads, so the streamer loads exactly that and every backend refuses,
in one line, a stage whose parameters its partial model does not hold (a shape-only parameter would
otherwise fail deep inside the framework, or on MLX compute silently with its unevaluated initial value).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import numpy as np

from .checks import check_chunk_tokens
from .config import Gemma3Config
from .errors import CheckpointError, InputError
from .params import EMBED, FINAL_NORM, LM_HEAD, layer_parameter_shapes, parameter_shapes


def check_layers(config: Gemma3Config, layers: object) -> range:
    """``layers`` as a range of consecutive block indices inside the model (an empty range is allowed)."""
    count = config.num_hidden_layers
    if not isinstance(layers, range) or layers.step != 1 or not 0 <= layers.start <= layers.stop <= count:
        raise InputError(f"layers must be a range of consecutive blocks within 0..{count}, e.g. range(0, 4), "
                         f"got {layers!r}")
    return layers


def stage_names(config: Gemma3Config, *, layers: range = range(0), embed: bool = False, head: bool = False) -> list[str]:
    """The canonical names a stage reads, in checkpoint order: the embedding matrix (``embed``: the pass
    starts from token ids), the blocks of ``layers``, then the final norm and the output matrix (``head``:
    the embedding itself when tied)."""
    check_layers(config, layers)
    names = [EMBED] if embed else []
    for layer in layers:
        names.extend(layer_parameter_shapes(config, layer))
    if head:
        names.append(FINAL_NORM)
        output = EMBED if config.tie_word_embeddings else LM_HEAD
        if output not in names:
            names.append(output)
    return names


def check_partial_names(config: Gemma3Config, names: Iterable[str]) -> frozenset[str]:
    """The names a partial build was given, all canonical for ``config``."""
    expected = parameter_shapes(config)
    given = frozenset(names)
    unknown = sorted(given - set(expected))
    if unknown:
        shown = ", ".join(unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise CheckpointError(f"weights hold tensors this config has no place for ({shown}): use a checkpoint made for it")
    return given


def check_resident(config: Gemma3Config, resident: Collection[str] | None, *, layers: range = range(0),
                   embed: bool = False, head: bool = False) -> None:
    """Refuse a stage whose parameters are not all resident (``resident`` None = a whole model)."""
    needed = stage_names(config, layers=layers, embed=embed, head=head)
    if resident is None:
        return
    missing = [name for name in needed if name not in resident]
    if missing:
        shown = ", ".join(missing[:2]) + (f" and {len(missing) - 2} more" if len(missing) > 2 else "")
        raise InputError(f"this partial model does not hold {shown}: build it (partial=True) with the weights of "
                         "the stage it runs (gemmalab.stages.stage_names)")


def check_run_layers(config: Gemma3Config, resident: Collection[str] | None, inputs: object, layers: object
                     ) -> tuple[range, bool]:
    """(layers, whether ``inputs`` are token ids) of a Backend.run_layers call, its stage checked against
    what the model holds: the checks every backend makes before any tensor work."""
    layers = check_layers(config, layers)
    from_ids = bool(np.issubdtype(np.asarray(inputs).dtype, np.integer))
    check_resident(config, resident, layers=layers, embed=from_ids)
    return layers, from_ids


def check_head_chunks(config: Gemma3Config, resident: Collection[str] | None, chunk_tokens: object) -> int:
    """The chunk length of a Backend.head_chunks call, its stage checked against what the model holds."""
    chunk = check_chunk_tokens(chunk_tokens)
    check_resident(config, resident, head=True)
    return chunk


def partial_problem() -> str:
    """The one line every backend gives when a whole-model method meets a partial model."""
    return ("this model holds only some of its weights (built with partial=True): run it with run_layers and "
            "head_chunks, or build it with all of them")


__all__ = ["check_head_chunks", "check_layers", "check_partial_names", "check_resident", "check_run_layers",
           "partial_problem", "stage_names"]
