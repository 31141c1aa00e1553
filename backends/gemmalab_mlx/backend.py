"""The MLX backend: gemmalab's Backend protocol (gemmalab/backend.py) over gemmalab_mlx.model.

Numpy at the boundary, MLX arrays inside. Weights are converted one tensor at a time and evaluated at
once, so a checkpoint never sits in memory twice; ``weights=None`` builds a shape-only model whose lazily
initialised parameters are never evaluated, so it allocates no parameter memory.

Generation: ``new_cache`` makes a ``gemmalab_mlx.cache.KVCache``; each ``extend`` builds the lazy graph of
one step (the layers, the cache writes, the head on the requested positions only) and evaluates it once.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping

import ml_dtypes
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gemmalab.backend import NO_POSITIONS, ForwardOutput
from gemmalab.checkpoint import Weights, quantized_linears
from gemmalab.checks import check_chunk_tokens, check_logits_mode, check_token_ids
from gemmalab.config import Gemma3Config
from gemmalab.dtypes import canonical_dtype
from gemmalab.errors import BackendError, CheckpointError, InputError
from gemmalab.linears import STACKING_KINDS, check_kind, checked_parameter_names
from gemmalab.stages import check_head_chunks, check_partial_names, check_run_layers, partial_problem
from gemmalab.train.inputs import prepare
from gemmalab.train.losses import CrossEntropy, LossSpec
from gemmalab.train.spec import LOSS_CHUNK_TOKENS, TrainSpec

from . import linears
from .cache import KVCache
from .model import DTYPES, Gemma3ForCausalLM
from .quantized import QuantizedLinear
from .training import Trainer, batch_arrays, chunked_loss_sum, hidden_state
from .wrappers import WRAPPERS

_BF16 = np.dtype(ml_dtypes.bfloat16)
_DEVICES = {"gpu": mx.gpu, "cpu": mx.cpu}


def to_mx(array: np.ndarray, dtype: mx.Dtype) -> mx.array:
    """A numpy float array (float32/float16/float64, bf16 via ml_dtypes) as an MLX array of ``dtype``."""
    array = np.asarray(array)
    if array.dtype == _BF16:
        # Reinterpret the bits: bf16 crosses without a detour through float32.
        out = mx.array(array.view(np.uint16)).view(mx.bfloat16)
    elif array.dtype in (np.float32, np.float16):
        out = mx.array(array)
    elif array.dtype == np.float64:
        out = mx.array(array.astype(np.float32))  # MLX computes in at most float32
    else:
        raise CheckpointError(
            f"weights of dtype {array.dtype} are not floating point: convert them to float32"
        )
    return out.astype(dtype)


def to_numpy(array: mx.array) -> np.ndarray:
    """An MLX array as numpy, bf16 as ml_dtypes.bfloat16 (numpy's buffer protocol has no bf16)."""
    if array.dtype == mx.bfloat16:
        return np.array(array.view(mx.uint16)).view(_BF16)
    return np.array(array)


class MLXBackend:
    """gemmalab's MLX backend (Apple Silicon GPU via Metal; the Linux build runs on CPU)."""

    name = "mlx"

    def version(self) -> str:
        return mx.__version__

    def devices(self) -> list[str]:
        return (["gpu"] if mx.is_available(mx.gpu) else []) + ["cpu"]

    def device(self, device: str | None) -> mx.Device:
        """The MLX device for a gemmalab device name ("gpu", "cpu"; None = MLX's default)."""
        if device is None:
            return mx.default_device()
        key = device.lower().removesuffix(":0")
        if key not in _DEVICES:
            raise BackendError(
                f"unknown device {device!r} for the mlx backend: use one of {', '.join(self.devices())}"
            )
        if key not in self.devices():
            raise BackendError(
                f"device {device!r} is not available in this MLX build: use device='cpu', "
                f"or the Metal build of mlx on Apple Silicon"
            )
        return mx.Device(_DEVICES[key])

    def build(
        self,
        config: Gemma3Config,
        weights: Mapping[str, np.ndarray] | None,
        *,
        dtype: str,
        device: str | None = None,
        partial: bool = False,
    ) -> Gemma3ForCausalLM:
        dtype = canonical_dtype(dtype)
        target = self.device(device)
        model = Gemma3ForCausalLM(config, dtype)
        model.eval()  # MLX modules start in training mode; the trainer turns it on for its steps only
        model.device = target
        model.resident = None  # None: every parameter (or, shape-only, none); a partial model's names
        if weights is None:
            return model  # shape-only: the lazy initial values are never evaluated
        quantized = quantized_linears(weights)
        if partial:  # the others keep their lazy initial values, never evaluated (gemmalab.stages checks)
            if quantized:
                raise BackendError("a partial (layer-streamed) model cannot hold quantized linears: use a dense checkpoint")
            model.resident = check_partial_names(config, weights)
            load_weights(model, weights, only=model.resident)
            return model
        # A quantized checkpoint's linears become the quantized wrapper holding the file's numbers; their
        # dense weights keep the lazy initial values, never evaluated, so none is ever allocated.
        load_weights(model, weights, skip={name + ".weight" for name in quantized})
        for name, entry in quantized.items():
            linears.wrap(model, [name], lambda _, name=name, entry=entry: QuantizedLinear.from_arrays(
                *weights.quantized_arrays(name), bits=entry.bits, group_size=entry.group_size, dtype=dtype))
        model.shape_only = False
        return model

    def logits(self, model: Gemma3ForCausalLM, ids: np.ndarray) -> np.ndarray:
        _require_weights(model)
        ids = _token_ids(model, ids)
        with mx.stream(model.device or mx.default_device()):
            out = model(ids).logits.astype(mx.float32)
            mx.eval(out)
        return np.array(out)

    def forward(
        self,
        model: Gemma3ForCausalLM,
        ids: np.ndarray,
        *,
        positions: np.ndarray,
        masks: Mapping[str, np.ndarray],
        hidden_states: tuple[int, ...] = (),
        attentions: tuple[int, ...] = (),
        logits: bool = True,
    ) -> ForwardOutput:
        _require_weights(model)
        ids = _token_ids(model, ids)
        with mx.stream(model.device or mx.default_device()):
            layer_masks = {kind: mx.array(np.ascontiguousarray(m[:, None])) for kind, m in masks.items()}
            out = model(ids, positions=mx.array(positions.astype(np.int32)), mask=layer_masks,
                        output_hidden_states=bool(hidden_states), output_attentions=frozenset(attentions),
                        logits_at=None if logits else NO_POSITIONS)
            head = out.logits.astype(mx.float32) if logits else None
            picked = {i: hidden_state(out, i).astype(mx.float32) for i in hidden_states}
            probs = {i: out.attentions[i] for i in attentions}
            mx.eval(head, picked, probs)
        return ForwardOutput(np.array(head) if logits else None, {i: np.array(a) for i, a in picked.items()},
                             {i: np.array(a) for i, a in probs.items()})

    def logit_chunks(
        self, model: Gemma3ForCausalLM, ids: np.ndarray, *, chunk_tokens: int = 512
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(start, float32 logits [batch, n, vocab]) of every ``chunk_tokens`` positions: the backbone is
        evaluated once, its final normed hidden states stay on the device, and the head
        (``logits_from_hidden``, with the soft-cap) is evaluated per chunk (Backend.logit_chunks)."""
        _require_weights(model)
        ids = _token_ids(model, ids)
        chunk = check_chunk_tokens(chunk_tokens)
        device = model.device or mx.default_device()
        with mx.stream(device):
            hidden = model.model(ids).last_hidden_state  # [batch, seq, hidden]
            mx.eval(hidden)  # once, here: each chunk's graph then starts from these values
        return _head_chunks(model, hidden, chunk, device)

    def run_layers(self, model: Gemma3ForCausalLM, inputs: np.ndarray, *, layers: range, positions: np.ndarray,
                   masks: Mapping[str, np.ndarray]) -> np.ndarray:
        """The residual stream after blocks ``layers`` (Backend.run_layers): from int ids the scaled
        embedding first, else from the residual stream ``inputs``; in the residual dtype, as numpy."""
        layers, from_ids = check_run_layers(model.config, model.resident, inputs, layers)
        if model.resident is None:
            _require_weights(model)
        with mx.stream(model.device or mx.default_device()):
            if from_ids:
                h = model.model.embed(_token_ids(model, inputs))
            else:
                h = to_mx(np.asarray(inputs), model.model.residual_dtype or DTYPES[model.dtype])
            layer_masks = {kind: mx.array(np.ascontiguousarray(m[:, None])) for kind, m in masks.items()}
            h = model.model.blocks(h, layers, positions=mx.array(np.asarray(positions).astype(np.int32)),
                                   mask=layer_masks)
            mx.eval(h)
        return to_numpy(h)

    def head_chunks(self, model: Gemma3ForCausalLM, hidden: np.ndarray, *, chunk_tokens: int = 512
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """(start, float32 logits) per ``chunk_tokens`` positions of the residual stream after the last block
        (Backend.head_chunks): final norm, head and soft-cap, as logit_chunks does after its backbone."""
        chunk = check_head_chunks(model.config, model.resident, chunk_tokens)
        if model.resident is None:
            _require_weights(model)
        device = model.device or mx.default_device()
        with mx.stream(device):
            h = to_mx(np.asarray(hidden), model.model.residual_dtype or DTYPES[model.dtype])
            normed = model.model.norm(h)
            mx.eval(normed)
        return _head_chunks(model, normed, chunk, device)

    # -- generation --------------------------------------------------------------------------------------
    def new_cache(
        self, model: Gemma3ForCausalLM, *, batch: int, pad_lengths: list[int] | None = None
    ) -> KVCache:
        # Buffers are allocated by the first extend, in the dtype of the keys it computes.
        return KVCache(model.config, batch, pad_lengths)

    def extend(
        self, model: Gemma3ForCausalLM, cache: KVCache, ids: np.ndarray, *, logits: str = "last",
        positions: np.ndarray | None = None, mask: np.ndarray | None = None, write: int | None = None,
    ) -> np.ndarray | None:
        _require_weights(model)
        check_logits_mode(logits)
        ids = _ids_for_cache(model, cache, ids, "extend")
        cache.planner.request(positions=positions, mask=mask, write=write)  # gemmalab.cache_plan, when given
        with mx.stream(model.device or mx.default_device()):
            if logits == "none":
                # Only the cache is evaluated: the head (and the last layer's MLP) are never computed.
                model.model(ids, cache=cache)
                mx.eval(cache.state)
                return None
            out = model(ids, cache=cache, logits_at=-1 if logits == "last" else None).logits  # [b, 1 or n, v]
            out = out.astype(mx.float32)
            if logits == "last":
                out = out[:, 0]  # [batch, vocab]
            mx.eval(out, cache.state)
        return np.array(out)

    def extend_forward(
        self, model: Gemma3ForCausalLM, cache: KVCache, ids: np.ndarray, *,
        positions: np.ndarray | None = None, mask: np.ndarray | None = None, write: int | None = None,
        hidden_states: tuple[int, ...] = (), attentions: tuple[int, ...] = (),
    ) -> ForwardOutput:
        """``extend`` returning the logits of every new position and the captures asked for, the keys in
        the core's plan layout (gemmalab.backend.ForwardOutput): the step always follows the plan."""
        _require_weights(model)
        ids = _ids_for_cache(model, cache, ids, "extend_forward")
        plan = cache.planner.request_plan(ids.shape[1], positions=positions, mask=mask, write=write)
        with mx.stream(model.device or mx.default_device()):
            out = model(ids, cache=cache, output_hidden_states=bool(hidden_states),
                        output_attentions=frozenset(attentions))
            logits = out.logits.astype(mx.float32)  # [batch, n, vocab]
            picked = {i: hidden_state(out, i).astype(mx.float32) for i in hidden_states}
            probs = {i: out.attentions[i] for i in attentions}
            mx.eval(logits, picked, probs, cache.state)
        return ForwardOutput(np.array(logits), {i: np.array(a) for i, a in picked.items()},
                             {i: np.array(a) for i, a in probs.items()},
                             plan.key_positions(model.config.layer_types, attentions))

    def greedy_tokens(
        self, model: Gemma3ForCausalLM, cache: KVCache, tokens: np.ndarray
    ) -> Iterator[np.ndarray]:
        """gemmalab.backend.GreedyAhead: each step's argmax is taken on the device and the next step is
        built and queued (``mx.async_eval``) before this step's ids are read, so building a step's graph
        overlaps computing the one before."""
        _require_weights(model)
        ids = _ids_for_cache(model, cache, np.asarray(tokens).reshape(-1, 1), "greedy_tokens")  # [batch, 1]
        device = model.device or mx.default_device()

        def queue_step(ids: mx.array) -> mx.array:
            with mx.stream(device):
                logits = model(ids, cache=cache, logits_at=-1).logits[:, -1]  # [batch, vocab]
                chosen = mx.argmax(logits, axis=-1).astype(mx.int32)[:, None]  # [batch, 1]
            mx.async_eval(chosen)
            return chosen

        current = queue_step(ids)
        while True:
            following = queue_step(current)  # queued behind `current`, built while it computes
            yield np.array(current[:, 0]).astype(np.int64)
            current = following

    def cache_nbytes(self, cache: KVCache) -> dict[str, int]:
        return cache.nbytes()

    def synchronize(self, model: Gemma3ForCausalLM) -> None:
        # extend and logits already wait for their results; this also covers work queued by direct use of
        # the native model (on the model device's default stream, where the backend runs it).
        mx.synchronize(model.device or mx.default_device())

    def peak_memory(self, model: Gemma3ForCausalLM) -> int | None:
        return mx.get_peak_memory()

    def reset_peak_memory(self, model: Gemma3ForCausalLM) -> None:
        mx.reset_peak_memory()

    def weights(self, model: Gemma3ForCausalLM) -> dict[str, np.ndarray]:
        """Every canonical parameter under its canonical name, in the model's dtype; the tied head once, as
        model.embed_tokens.weight; a wrapped linear as its wrapper's fused dense weight (linears.py), and
        nothing else of the wrapper."""
        _require_weights(model)
        return {name: to_numpy(array) for name, array in linears.dense_weights(model).items()}

    def num_parameters(self, model: Gemma3ForCausalLM) -> int:
        """Elements of the parameters the model holds (``parameter_shapes``): the tied matrix once, a
        wrapped linear's base weight and its wrapper's own parameters (so a wrapped model counts more than
        its config's ``num_parameters``)."""
        # .size reads the shape: lazy (shape-only) parameters are not evaluated.
        return sum(p.size for _, p in tree_flatten(model.parameters()))

    def parameter_shapes(self, model: Gemma3ForCausalLM) -> dict[str, tuple[int, ...]]:
        """Every parameter the model holds by name, with its shape: the canonical names, except that a
        wrapped linear's weight is ``<linear>.base.weight`` beside its wrapper's ``<linear>.<param>``."""
        return {name: tuple(p.shape) for name, p in linears.named_parameters(model).items()}

    def parameters(self, model: Gemma3ForCausalLM, names: Collection[str]) -> dict[str, np.ndarray]:
        """The parameters ``names`` (of ``parameter_shapes``) as numpy copies in the model's dtype."""
        held = linears.named_parameters(model)
        return {name: np.array(to_numpy(held[name])) for name in checked_parameter_names(held, names)}

    def wrap(self, model: Gemma3ForCausalLM, names: Collection[str], kind: str, **options) -> list[str]:
        """Wrap the linears ``names`` (exact names) with the wrapper ``kind`` (gemmalab.linears.WRAPPER_KINDS),
        built with ``options``; returns the names wrapped."""
        cls = WRAPPERS[check_kind(kind)]
        return list(linears.wrap(model, names, lambda base: cls.from_base(base, **options),
                                 stack=kind in STACKING_KINDS))

    def fuse(self, model: Gemma3ForCausalLM) -> list[str]:
        """Fuse every wrapper back into a plain dense linear; returns the names fused."""
        return linears.fuse(model)

    # -- training ----------------------------------------------------------------------------------------
    def trainer(self, model: Gemma3ForCausalLM, spec: TrainSpec,
                companions: Mapping[str, Gemma3ForCausalLM] | None = None,
                loss_parameters: Mapping[str, np.ndarray] | None = None) -> Trainer:
        """A Trainer (gemmalab_mlx.training) of ``model``; ``loss_parameters`` are the starting values of the
        loss's projections (None = fresh from seed 0), which train beside the model and are never in
        ``weights(model)``."""
        _require_weights(model)
        return Trainer(model, spec, companions, loss_parameters)

    def loss_sum(
        self,
        model: Gemma3ForCausalLM,
        inputs: np.ndarray,
        targets: np.ndarray,
        weights: np.ndarray,
        *,
        chunk_tokens: int = LOSS_CHUNK_TOKENS,
        label_smoothing: float = 0.0,
    ) -> float:
        _require_weights(model)
        loss = LossSpec(head=(CrossEntropy(label_smoothing=label_smoothing),))
        batch = batch_arrays(prepare(model.config, loss, inputs, targets, weights))
        with mx.stream(model.device or mx.default_device()):
            return chunked_loss_sum(model, batch, loss, chunk_tokens=chunk_tokens)


def load_weights(model: Gemma3ForCausalLM, weights: Mapping[str, np.ndarray], *, only: Collection[str] | None = None,
                 skip: Collection[str] = ()) -> None:
    """Load canonical-name numpy weights into ``model`` strictly, casting each to the model's dtype; with
    ``only``, exactly those parameters (a partial model's), the others untouched; ``skip`` names parameters
    that are not given and stay untouched (a quantized checkpoint's linears, wrapped after).

    Every tensor is converted and evaluated before the next is read, so with a lazy mapping (safetensors
    shards) only one source tensor is alive at a time. A checkpoint's ``Weights`` are read by MLX itself
    (``mx.load`` is lazy and reads straight into MLX buffers): through numpy a tensor sits in memory up to
    three times at once (file pages, numpy copy, MLX copy), a load-time peak RSS of 2.15 GB for the 1.07 GB
    of the 270M in float32, against 1.09 GB this way.
    """
    expected = dict(tree_flatten(model.parameters()))
    if only is not None:
        expected = {name: param for name, param in expected.items() if name in only}
    expected = {name: param for name, param in expected.items() if name not in skip}
    # The names, by iteration: `name in weights` would read the tensor on a Mapping without __contains__.
    given = set(weights)
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    if missing or unexpected:
        problems = ([f"missing {_some(missing)}"] if missing else []) + (
            [f"unexpected {_some(unexpected)}"] if unexpected else []
        )
        raise CheckpointError(
            f"weights do not match the {model.config.name or 'configured'} model: "
            f"{'; '.join(problems)}: check the checkpoint against its config.json"
        )
    dtype = DTYPES[model.dtype]
    read = _mlx_reader(weights, dtype) if isinstance(weights, Weights) else None
    loaded = []
    with mx.stream(model.device or mx.default_device()):
        for name, param in expected.items():
            source = weights[name] if read is None else read(name)
            if tuple(source.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{name} has shape {tuple(source.shape)} but the config needs {tuple(param.shape)}: "
                    f"the checkpoint does not match its config.json"
                )
            value = to_mx(source, dtype) if read is None else source.astype(dtype)
            mx.eval(value)
            loaded.append((name, value))
    model.load_weights(loaded, strict=only is None and not skip)


def _mlx_reader(weights: Weights, dtype: mx.Dtype):
    """name -> lazy MLX array read from the checkpoint's safetensors file (nothing is read until evaluated);
    a quantized embedding (``Weights.dequantized``) as the dense matrix the core dequantizes."""
    files: dict = {}

    def read(name: str) -> mx.array:
        if name in weights.dequantized:
            return to_mx(weights[name], dtype)
        file, key = weights.locations[name]
        if file not in files:
            files[file] = mx.load(str(file))  # lazy: maps names to arrays that read on evaluation
        value = files[file][key]
        if not mx.issubdtype(value.dtype, mx.floating):
            raise CheckpointError(
                f"{name} ({key} in {file.name}) has dtype {value.dtype}, not floating point: "
                f"convert the checkpoint's weights to float32"
            )
        return value

    return read


def _head_chunks(model: Gemma3ForCausalLM, hidden: mx.array, chunk: int, device: mx.Device) -> Iterator[tuple[int, np.ndarray]]:
    """The output head on ``hidden`` [batch, seq, hidden], ``chunk`` positions at a time (logit_chunks)."""
    for start in range(0, hidden.shape[1], chunk):
        with mx.stream(device):
            logits = model.logits_from_hidden(hidden[:, start : start + chunk]).astype(mx.float32)
            mx.eval(logits)
        yield start, np.array(logits)  # [batch, n, vocab]


def _token_ids(model: Gemma3ForCausalLM, ids: np.ndarray) -> mx.array:
    """Checked int token ids [batch, seq] as an MLX int32 array (MLX gathers do not check bounds: an
    out-of-range id would read garbage silently)."""
    return mx.array(check_token_ids(ids, model.config.vocab_size).astype(np.int32))


def _ids_for_cache(model: Gemma3ForCausalLM, cache: KVCache, ids: np.ndarray, caller: str) -> mx.array:
    """Checked token ids [cache.batch, n >= 1] to feed after what ``cache`` (made for ``model``) holds."""
    if not isinstance(cache, KVCache) or cache.config != model.config:
        raise InputError("this cache was not made for this model: make one with new_cache(model, ...)")
    ids = _token_ids(model, ids)
    if ids.shape[0] != cache.batch or ids.shape[1] == 0:
        raise InputError(
            f"{caller} needs token ids [{cache.batch}, n >= 1] for this cache, got {tuple(ids.shape)}"
        )
    return ids


def _require_weights(model: Gemma3ForCausalLM) -> None:
    if getattr(model, "resident", None) is not None:
        raise BackendError(partial_problem())
    if getattr(model, "shape_only", False):
        raise BackendError("this model was built shape-only (weights=None): build it with weights to compute")


def _some(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
