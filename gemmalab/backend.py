"""What a backend is, and how the core finds one.

A backend is a package named ``gemmalab_<name>`` that exposes ``BACKEND``, an object with the methods of
``Backend`` below. The core finds backends through the ``gemmalab.backends`` entry-point group (a
third-party backend registers itself there) and, for the built-in ones, by module name. Importing this
module imports no array framework: a framework is imported only when its backend is first asked for.

Backends speak numpy at this boundary: weights come in as a mapping of canonical (HF) names to numpy
arrays (bf16 as ``ml_dtypes.bfloat16``), token ids come in as integer arrays, logits go out as float32.
"""

from __future__ import annotations

import importlib
import os
import platform
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .config import Gemma3Config
from .errors import BackendError

# Built-in backends, in the order `auto` prefers them when several would do.
BUILTIN = {"mlx": "gemmalab_mlx", "torch": "gemmalab_torch", "jax": "gemmalab_jax"}
ENV_VAR = "GEMMALAB_BACKEND"


# ``logits_at`` that runs the output head on no position: a forward pass for its captures only.
NO_POSITIONS = slice(0, 0)


@dataclass
class ForwardOutput:
    """What ``Backend.forward`` returns, in numpy float32.

    ``hidden_states`` follows transformers' ``output_hidden_states``: index 0 is the scaled embeddings, index
    i (1 <= i < layers) the output of block i - 1, index ``layers`` the last block's output after the final
    norm. ``attentions`` maps a layer index to its probabilities [batch, heads, query, key]. Each holds only
    the indices that were asked for.

    From a cached step (``Backend.extend_forward``) every array covers the new tokens only, and the key
    axis of ``attentions[i]`` is the cache plan's layout (gemmalab.cache_plan): the cache's slots as they
    were before the step, in slot order (a wrapped ring is not in position order), then the new tokens.
    ``key_positions[i]`` [batch, keys] gives the position each key column holds (cache_plan.NO_POSITION
    for padding). An uncached pass leaves it empty: its keys are the sequence's own tokens, in order."""

    logits: np.ndarray | None  # [batch, seq, vocab]; None when the pass was asked for no logits
    hidden_states: dict[int, np.ndarray]
    attentions: dict[int, np.ndarray]
    key_positions: dict[int, np.ndarray] = field(default_factory=dict)  # cached steps: [batch, keys] int64


@runtime_checkable
class Backend(Protocol):
    """The tensor work gemmalab asks of an array framework."""

    name: str

    def version(self) -> str:
        """The framework's version string."""

    def devices(self) -> list[str]:
        """Devices this backend can compute on here, best first (e.g. ['cuda:0', 'cpu'])."""

    def build(
        self,
        config: Gemma3Config,
        weights: Mapping[str, np.ndarray] | None,
        *,
        dtype: str,
        device: str | None = None,
        partial: bool = False,
    ) -> Any:
        """The backend-native model. ``weights`` maps every canonical name of ``params.parameter_shapes``
        to an array of that shape (already validated by the core), in any float dtype: the backend casts
        them to ``dtype`` one at a time, so the full checkpoint never sits in memory twice. With
        ``weights=None`` the model is built shape-only, allocating no parameter memory. A quantized
        checkpoint's ``Weights`` (gemmalab.checkpoint) leave out its quantized linears' weights and list
        them in ``weights.quantized``: the backend builds each as its ``quantized`` wrapper from
        ``weights.quantized_arrays(name)`` (``QuantizedLinear.from_arrays``), allocating no dense copy.

        ``partial=True`` builds a model holding only the given weights (any subset of the canonical names),
        the others shape-only: a stage of a layer-streamed model (gemmalab.streaming), which runs only
        through ``run_layers`` and ``head_chunks``, each refusing a stage whose parameters it does not hold
        (gemmalab.stages.check_resident); every other method refuses a partial model in one line."""

    def logits(self, model: Any, ids: np.ndarray) -> np.ndarray:
        """float32 logits [batch, seq, vocab] for int token ids [batch, seq], every position."""

    def forward(
        self,
        model: Any,
        ids: np.ndarray,
        *,
        positions: np.ndarray,
        masks: Mapping[str, np.ndarray],
        hidden_states: tuple[int, ...] = (),
        attentions: tuple[int, ...] = (),
        logits: bool = True,
    ) -> ForwardOutput:
        """One uncached pass over int ids [batch, seq] at int ``positions`` [batch, seq] (they drive RoPE),
        with one boolean mask [batch, seq, seq] per layer type (True = may attend), as the core builds them
        (gemmalab.masks.layer_masks: the window of local layers is already in theirs). Returns the logits
        of every position and the captures asked for by index (see ForwardOutput); only the layers in
        ``attentions`` leave the fused attention kernel. ``logits=False`` skips the output head (the
        returned logits are None): a pass for its hidden states, e.g. a distillation teacher's."""

    def logit_chunks(self, model: Any, ids: np.ndarray, *, chunk_tokens: int = 512) -> Iterator[tuple[int, np.ndarray]]:
        """The logits of every position of int ids [batch, seq], ``chunk_tokens`` positions at a time: the
        causal backbone runs once over the whole sequence (positions 0 .. seq-1, the built-in masks) to the
        final normed hidden states, which stay on the device; then, chunk after chunk, the output head (and
        the config's final_logit_softcapping when set) runs on the hidden states of that chunk only, and
        ``(start, logits)`` is yielded: the chunk's first position and its float32 logits [batch, n, vocab],
        n = min(chunk_tokens, seq - start). A teacher with a 262k vocabulary so never holds the
        [batch, seq, vocab] logits of ``logits`` at once (an offline teacher cache reduces each chunk to its
        top-k before asking for the next). The values are those of ``logits`` on the same ids. Bad ids or
        chunk_tokens raise at the call, before anything is computed."""

    def run_layers(self, model: Any, inputs: np.ndarray, *, layers: range, positions: np.ndarray,
                   masks: Mapping[str, np.ndarray]) -> np.ndarray:
        """The residual stream [batch, seq, hidden] after the decoder blocks ``layers`` (consecutive
        indices, gemmalab.stages.check_layers), as numpy in the residual dtype (the model's; float32 in a
        float16 model; bf16 via ml_dtypes). ``inputs`` are int token ids [batch, seq], embedded and scaled
        first (the model must hold the embedding), or the residual stream from an earlier call. ``positions``
        and ``masks`` as in ``forward``. No final norm: ``head_chunks`` applies it. A whole model gives the
        residual streams of ``forward``'s hidden states; a partial one needs only these blocks."""

    def head_chunks(self, model: Any, hidden: np.ndarray, *, chunk_tokens: int = 512) -> Iterator[tuple[int, np.ndarray]]:
        """``logit_chunks`` after the backbone: the final norm, the output head and the soft-cap on the
        residual stream after the last block (``run_layers``' output), ``chunk_tokens`` positions at a time,
        yielding ``(start, float32 logits [batch, n, vocab])``. The model must hold the final norm and the
        output matrix (the embedding when tied)."""

    def weights(self, model: Any) -> dict[str, np.ndarray]:
        """Every canonical parameter (params.parameter_shapes) under its name and nothing else, as numpy
        in the model's dtype (bf16 via ml_dtypes): what a checkpoint holds. The tied head appears once, as
        model.embed_tokens.weight; a wrapped linear appears as its wrapper's fused dense weight."""

    def num_parameters(self, model: Any) -> int:
        """Elements of the parameters the native model holds (``parameter_shapes``), the tied matrix
        counted once: config.num_parameters() for a plain model, plus each wrapper's own parameters."""

    def parameter_shapes(self, model: Any) -> dict[str, tuple[int, ...]]:
        """Every parameter the native model holds, by the name its trainer uses, with its shape: the
        canonical names, except that a wrapped linear's weight is ``<linear>.base.weight``
        (linears.base_weight) and its wrapper's own parameters are ``<linear>.<param>``."""

    def parameters(self, model: Any, names: Collection[str]) -> dict[str, np.ndarray]:
        """The parameters ``names`` (names of ``parameter_shapes``, e.g. a wrapper's own ``<linear>.lora_A``)
        as numpy copies in the model's dtype; an unknown name is an InputError naming it."""

    # -- wrappers of linear layers (gemmalab.linears; the walkers are gemmalab_<name>.linears) ------------
    def wrap(self, model: Any, names: Collection[str], kind: str, **options: Any) -> list[str]:
        """Replace the linears ``names`` (exact names, linears.check_wrappable) in place by wrappers of
        ``kind`` (linears.WRAPPER_KINDS, e.g. "output_scale") built with ``options``; returns the names.
        Unknown names, the tied head and a linear already wrapped are InputErrors, and nothing changes."""

    def fuse(self, model: Any) -> list[str]:
        """Replace every wrapper by a plain dense linear holding its fused weight; returns the names."""

    # -- generation: KV caches and incremental forward passes (the loop itself lives in the core) --------
    def new_cache(self, model: Any, *, batch: int, pad_lengths: list[int] | None = None) -> Any:
        """An empty KV cache for ``batch`` sequences fed in lock-step.

        Local (sliding-window) layers keep a ring buffer of exactly ``config.sliding_window`` entries, so
        their memory stays flat however long the context grows; global layers keep every position (their
        buffer grows as tokens arrive). ``pad_lengths[r]`` is the number of left-padding tokens at the start
        of row r (batched generation with left padding): those slots are fed like other tokens but never
        attended to, and row r's positions count from its first real token (position = index - pad)."""

    def extend(
        self, model: Any, cache: Any, ids: np.ndarray, *, logits: str = "last",
        positions: np.ndarray | None = None, mask: np.ndarray | None = None, write: int | None = None,
    ) -> np.ndarray | None:
        """Feed int ids [batch, n] (n >= 1) after everything already in ``cache``, updating it in place.

        Each new token attends to the cached tokens and to the new ones before it, with the sliding window
        on local layers, exactly as a full forward pass over the whole sequence would. Returns float32
        logits: ``"last"`` -> [batch, vocab] for the last new position only (the output head runs on that
        position alone: prefill never computes logits nobody reads), ``"all"`` -> [batch, n, vocab],
        ``"none"`` -> None (earlier chunks of a chunked prefill).

        ``positions`` ([n] or [batch, n]), ``mask`` (boolean over the new tokens, [n, n] or [batch, n, n])
        and ``write`` (store only the first ``write`` new tokens; 0 = look without storing) follow the
        core's plan, gemmalab.cache_plan, exactly (reference.CachedReference is the oracle)."""

    def extend_forward(
        self, model: Any, cache: Any, ids: np.ndarray, *, positions: np.ndarray | None = None,
        mask: np.ndarray | None = None, write: int | None = None, hidden_states: tuple[int, ...] = (),
        attentions: tuple[int, ...] = (),
    ) -> ForwardOutput:
        """``extend`` with what the model computes inside the step: the same feeding of ids [batch, n] and
        the same cache update (``positions``, ``mask``, ``write`` as there), returning a ForwardOutput of
        the new tokens only: float32 logits [batch, n, vocab] of every new position, the hidden states
        [batch, n, hidden] asked for by index, and the probabilities [batch, heads, n, keys] of the layers
        in ``attentions`` (only those leave the fused kernel), with ``key_positions`` per captured layer.

        The step always follows the core's plan (CachePlanner.request_plan), even when nothing explicit is
        asked, so the key axis is the plan's on every backend (ForwardOutput). ``extend`` stays the fast
        path of generation."""

    def cache_nbytes(self, cache: Any) -> dict[str, int]:
        """Bytes held by the cache's key/value buffers, per layer type:
        {"sliding_attention": ..., "full_attention": ...}."""

    def synchronize(self, model: Any) -> None:
        """Wait until queued work on the model's device is done (for honest timings)."""

    def peak_memory(self, model: Any) -> int | None:
        """Peak bytes the framework allocated on the model's device since the last reset, when it
        tracks them (CUDA, MPS, MLX); None where it does not (PyTorch on CPU)."""

    def reset_peak_memory(self, model: Any) -> None:
        """Start a new peak-memory measurement (no-op where peak_memory returns None)."""

    # -- training: the tensor work of gemmalab.train (the loop itself lives in the core) -----------------
    def trainer(self, model: Any, spec: Any, companions: Mapping[str, Any] | None = None,
                loss_parameters: Mapping[str, np.ndarray] | None = None) -> Any:
        """A ``gemmalab.train.spec.BackendTrainer`` for ``model`` (built in float32) following ``spec``
        (a ``gemmalab.train.spec.TrainSpec``): the optimizer, the chunked loss and a gradient accumulator.

        ``companions`` maps a name to another model built by this backend (``build``, any dtype: e.g. a bf16
        teacher beside a float32 student), read by the loss's Distillation and transfer terms
        (``Distillation.teacher``, ``HiddenStateTransfer.teacher``, ...; checked by
        gemmalab.train.spec.check_companions). Companions are frozen: never trained, no gradient computed for
        them, never in the trainer's gradients, optimizer state or ``weights(trainer.model)``.

        ``loss_parameters`` are the starting values of the loss's own trainable parameters (its projections,
        gemmalab.train.transfer; None = fresh ones from seed 0, ``transfer.checked_loss_parameters``). They
        train with the model, under their own names in ``gradients()`` and the optimizer state, and are read
        back with the trainer's ``loss_parameters()``; they are never in ``weights(trainer.model)``."""

    def loss_sum(
        self,
        model: Any,
        inputs: np.ndarray,
        targets: np.ndarray,
        weights: np.ndarray,
        *,
        chunk_tokens: int = 512,
        label_smoothing: float = 0.0,
    ) -> float:
        """sum(weights * token cross-entropy) of next-token targets, no gradients, with the head and loss
        run ``chunk_tokens`` positions at a time (the loss ``BackendTrainer.accumulate`` differentiates)."""


@runtime_checkable
class GreedyAhead(Protocol):
    """Optional: a backend that decodes greedily one step ahead on its device.

    With ``extend`` every step makes a round trip: the logits come to the host, the core's sampler picks
    the tokens, they go back. For pure greedy decoding (the core decides when that is) a backend may take
    the argmax on its device instead and build the next step before the current one's tokens are read, so
    the host's work of a step overlaps the device's (mlx-lm decodes this way). The tokens are the ones
    ``extend`` plus an argmax of its float32 logits would give.
    """

    def greedy_tokens(self, model: Any, cache: Any, tokens: np.ndarray) -> Iterator[np.ndarray]:
        """Feed int ids [batch] (one per row, after everything in ``cache``) and yield, step after step,
        the argmax ids [batch] of the position each step adds, computing one step ahead of what was
        yielded. The cache holds that extra step when the caller stops; the caller closes the iterator."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    module: str
    usable: bool
    version: str | None = None
    devices: tuple[str, ...] = ()
    problem: str | None = None


def _registered() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in entry_points(group="gemmalab.backends"):
        found.setdefault(ep.name, ep.value)
    return found


_loaded: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend called ``name``, imported on first use. Raises BackendError naming the fix."""
    if name in _loaded:
        return _loaded[name]
    registry = _registered()
    if name not in registry:
        raise BackendError(f"unknown backend {name!r}: choose one of auto, {', '.join(registry)}")
    module_name = registry[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        if getattr(err, "name", None) == module_name:
            raise BackendError(f"backend {name!r} is not installed (no module {module_name})") from None
        raise BackendError(
            f"backend {name!r} needs {getattr(err, 'name', None) or err}, which does not import here: "
            f"install it with `pip install 'gemmalab[{name}]'` or run ./setup.sh"
        ) from None
    backend = getattr(module, "BACKEND", None)
    if backend is None:
        raise BackendError(f"module {module_name} has no BACKEND object: it is not a gemmalab backend")
    _loaded[name] = backend
    return backend


def probe(name: str) -> BackendInfo:
    """Import a backend and ask it for its version and devices, without raising."""
    module = _registered().get(name, "?")
    try:
        backend = get_backend(name)
        return BackendInfo(name, module, True, backend.version(), tuple(backend.devices()))
    except BackendError as err:
        return BackendInfo(name, module, False, problem=str(err))
    except Exception as err:  # a broken install must not crash `gemmalab check`
        return BackendInfo(name, module, False, problem=f"{type(err).__name__}: {err}")


def available_backends() -> list[str]:
    """Names of the installed, usable backends."""
    return [name for name in _registered() if probe(name).usable]


def _is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def _has_tpu() -> bool:
    return os.path.exists("/dev/accel0") or bool(os.environ.get("TPU_NAME"))


def resolve_backend_name(name: str | None = None) -> str:
    """Apply the choice rule: explicit name, else $GEMMALAB_BACKEND, else auto.

    auto = MLX on Apple Silicon, JAX on a TPU host, else PyTorch (CUDA when present, else CPU); when the
    preferred one is not installed, the first usable backend in BUILTIN order.
    """
    chosen = name or os.environ.get(ENV_VAR) or "auto"
    if chosen != "auto":
        get_backend(chosen)  # raises a clear error when it is unknown or not installed
        return chosen
    if _is_apple_silicon():
        preferred = ["mlx", "torch", "jax"]
    elif _has_tpu():
        preferred = ["jax", "torch", "mlx"]
    else:
        preferred = ["torch", "jax", "mlx"]
    for candidate in preferred + [n for n in _registered() if n not in preferred]:
        if probe(candidate).usable:
            return candidate
    raise BackendError("no backend is installed: run ./setup.sh, or `pip install 'gemmalab[torch]'` (or [mlx], [jax])")
