"""A model larger than memory, run with only a few decoder blocks resident at a time.

``LayerStream`` reads a checkpoint's safetensors files stage by stage: the embedding matrix, then groups of
``layers_per_group`` decoder blocks, then the final norm and the output head. Each stage is built as a
partial model (Backend.build ``partial=True``) holding only its own weights, and the whole set of batches
passes through it (Backend.run_layers, Backend.head_chunks) before it is dropped and the next is read. The
residual streams of every batch wait on the host between stages, so the resident weights are one stage's,
at most max(embedding, one group, head), plus those activations; the price is one read of the weights per
call, whatever the number of batches (so a caller gives many batches at once).

The values are those of the resident model on the same ids (positions 0 .. seq-1, the built-in masks): the
residual stream crosses the host in its own dtype between stages, which changes no bit of it, so torch gives the
resident logits bit for bit; MLX and JAX within float32 rounding (the resident pass may take a fused causal
kernel or fuse across blocks where the stages pass explicit masks). This is for
work that needs no gradient and reads each batch's logits once: building an offline teacher cache
(gemmalab.distill.cache) and scoring a model (gemmalab.train.evaluation).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint
from .backend import get_backend, resolve_backend_name
from .checks import check_chunk_tokens, check_token_ids, is_count
from .config import Gemma3Config
from .dtypes import canonical_dtype, numpy_dtype
from .errors import ConfigError
from .masks import layer_masks
from .params import parameter_shapes
from .stages import stage_names

Phase = Callable[[str], None]


def check_layers_per_group(value: object) -> int:
    """Blocks resident at once: a positive integer."""
    if not is_count(value) or value < 1:
        raise ConfigError(f"--stream-layers must be a positive number of blocks, got {value!r}: pass e.g. --stream-layers 4")
    return int(value)


@dataclass
class LayerStream:
    """A model run stage by stage from its files (the module docstring). ``weights`` is a lazy mapping
    (checkpoint.Weights): a stage reads only its own tensors."""

    backend: Any
    config: Gemma3Config
    weights: Mapping[str, np.ndarray]
    dtype: str
    layers_per_group: int
    device: str | None = None

    @classmethod
    def open(cls, source: str | Path, *, layers_per_group: int, backend: str | None = None, dtype: str | None = None,
             device: str | None = None) -> LayerStream:
        """The stream of a checkpoint (a folder or a cached Hub id), in ``dtype`` (default: the checkpoint's
        stored dtype, else float32). Nothing but the config and the safetensors headers is read here."""
        layers_per_group = check_layers_per_group(layers_per_group)
        folder = checkpoint.locate(source)
        config = checkpoint.load_config(folder)
        weights = checkpoint.read_weights(folder, config)
        dtype = canonical_dtype(dtype) if dtype else (config.stored_dtype or "float32")
        return cls(get_backend(resolve_backend_name(backend)), config, weights, dtype, layers_per_group, device)

    @property
    def itemsize(self) -> int:
        """Bytes per weight element in the stream's dtype."""
        return np.dtype(numpy_dtype(self.dtype)).itemsize

    def groups(self) -> list[range]:
        """The groups of consecutive blocks, each resident on its own."""
        count, size = self.config.num_hidden_layers, self.layers_per_group
        return [range(start, min(start + size, count)) for start in range(0, count, size)]

    def stages(self) -> list[dict[str, Any]]:
        """Every stage in order, as the keyword arguments of gemmalab.stages.stage_names."""
        return [{"embed": True}, *({"layers": group} for group in self.groups()), {"head": True}]

    def resident_bytes(self) -> int:
        """The most weight bytes any stage holds: the stream's weight memory, against the whole model's
        ``params.parameter_bytes``."""
        shapes, size = parameter_shapes(self.config), self.itemsize
        return max(sum(math.prod(shapes[name]) for name in stage_names(self.config, **stage)) * size
                   for stage in self.stages())

    def logit_chunks(self, batches: Sequence[np.ndarray], *, chunk_tokens: int = 512,
                     phase: Phase | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(batch index, start, float32 logits [rows, n, vocab])`` of every batch of int ids [rows, seq]
        (batches may differ in shape), ``chunk_tokens`` positions at a time: Backend.logit_chunks for many
        batches, each batch's chunks in position order, the batches in order. ``phase`` hears which stage
        runs (for a progress view). Bad ids raise before any weight is read."""
        batches = [check_token_ids(ids, self.config.vocab_size) for ids in batches]
        chunk = check_chunk_tokens(chunk_tokens)
        if not batches:
            return iter(())
        return self._run(batches, chunk, phase or (lambda text: None))

    def _run(self, batches: list[np.ndarray], chunk: int, phase: Phase) -> Iterator[tuple[int, int, np.ndarray]]:
        layouts = {ids.shape: self._layout(*ids.shape) for ids in batches}  # positions and masks per shape
        count = self.config.num_hidden_layers
        phase("embedding")
        stage = self._stage(embed=True)
        streams = [self.backend.run_layers(stage, ids, layers=range(0), **layouts[ids.shape]) for ids in batches]
        for group in self.groups():
            stage = None  # the last stage's weights go before the next stage is read
            _collect()
            phase(f"blocks {group.start + 1}-{group.stop} of {count}")
            stage = self._stage(layers=group)
            for index, ids in enumerate(batches):
                streams[index] = self.backend.run_layers(stage, streams[index], layers=group, **layouts[ids.shape])
        stage = None
        _collect()
        phase("output head")
        stage = self._stage(head=True)
        for index in range(len(batches)):
            for start, logits in self.backend.head_chunks(stage, streams[index], chunk_tokens=chunk):
                yield index, start, logits
            streams[index] = None  # this batch is done: its residual stream goes
        stage = None
        _collect()

    def _layout(self, rows: int, seq: int) -> dict[str, Any]:
        positions = np.broadcast_to(np.arange(seq, dtype=np.int64), (rows, seq)).copy()
        return {"positions": positions, "masks": layer_masks(self.config, positions)}

    def _stage(self, **stage: Any) -> Any:
        names = stage_names(self.config, **stage)
        weights = self.weights.subset(names) if isinstance(self.weights, checkpoint.Weights) else {
            name: self.weights[name] for name in names}
        return self.backend.build(self.config, weights, dtype=self.dtype, device=self.device, partial=True)



def _collect() -> None:
    """Free a dropped stage now: a framework object in a reference cycle would otherwise keep its buffers
    until the collector happens to run, while the next stage is already being read."""
    gc.collect()


def stream_logit_chunks(backend: Any, model_or_stream: Any, batches: Sequence[np.ndarray], *, chunk_tokens: int,
                        phase: Phase | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(batch index, start, logits)`` of every batch, from a resident native model (Backend.logit_chunks,
    batch after batch) or from a ``LayerStream`` (whose stages ``phase`` hears)."""
    if isinstance(model_or_stream, LayerStream):
        yield from model_or_stream.logit_chunks(batches, chunk_tokens=chunk_tokens, phase=phase)
        return
    for index, ids in enumerate(batches):
        for start, logits in backend.logit_chunks(model_or_stream, ids, chunk_tokens=chunk_tokens):
            yield index, start, logits


__all__ = ["LayerStream", "check_layers_per_group", "stream_logit_chunks"]
