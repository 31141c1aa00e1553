"""The PyTorch backend: gemmalab's Backend protocol (gemmalab/backend.py) over model.Gemma3ForCausalLM.

Numpy at the boundary, torch inside. Weights arrive as canonical name -> numpy array (float32, float16, or
bfloat16 through ml_dtypes) and are converted one tensor at a time, straight into the target dtype and
device, so a checkpoint never sits in memory twice.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterator, Mapping

import ml_dtypes
import numpy as np
import torch
from torch import nn

from gemmalab.backend import NO_POSITIONS, ForwardOutput
from gemmalab.checkpoint import Weights, quantized_linears
from gemmalab.checks import check_cache_request, check_chunk_tokens, check_logits_mode, check_token_ids
from gemmalab.config import Gemma3Config
from gemmalab.dtypes import canonical_dtype, numpy_dtype
from gemmalab.errors import BackendError, CheckpointError, InputError
from gemmalab.linears import STACKING_KINDS, check_kind, checked_parameter_names
from gemmalab.params import parameter_shapes
from gemmalab.stages import check_head_chunks, check_partial_names, check_run_layers, partial_problem
from gemmalab.train.inputs import prepare
from gemmalab.train.losses import CrossEntropy, LossSpec
from gemmalab.train.spec import LOSS_CHUNK_TOKENS

from . import linears
from .cache import KVCache
from .model import DTYPES, Gemma3ForCausalLM, residual_dtype
from .quantized import QuantizedLinear
from .training import Trainer, batch_arrays, chunked_loss_sum, hidden_state
from .wrappers import WRAPPERS

_BF16 = np.dtype(ml_dtypes.bfloat16)


def to_torch(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fresh tensor of ``dtype`` on ``device`` holding ``array`` (never a view of the caller's memory)."""
    array = np.ascontiguousarray(array)
    if array.dtype == _BF16:
        # torch.from_numpy does not know ml_dtypes' bfloat16: reinterpret the same 16 bits.
        array = array.view(np.int16)
        bf16 = True
    else:
        bf16 = False
    with warnings.catch_warnings():
        # Read-only arrays (memory-mapped safetensors) make from_numpy warn; we only read, then copy.
        warnings.simplefilter("ignore", UserWarning)
        source = torch.from_numpy(array)
    if bf16:
        source = source.view(torch.bfloat16)
    return source.to(device=device, dtype=dtype, copy=True)


def _compute_device(model: Gemma3ForCausalLM) -> torch.device:
    """Where the model computes: the device of its resident parameters (a partial model's others are on
    'meta')."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), model.device)


def to_numpy(tensor: torch.Tensor, *, writable: bool = False) -> np.ndarray:
    """A numpy array of a tensor's values in its own dtype (bfloat16 through ml_dtypes). On CPU this is a
    view of the tensor's memory (no copy), read-only unless ``writable``; elsewhere a host copy."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        array = tensor.view(torch.int16).numpy().view(_BF16)
    else:
        array = tensor.numpy()
    if not writable:
        array.flags.writeable = False  # (numpy refuses to set it back to True on a view of torch memory)
    return array


class TorchBackend:
    """gemmalab's PyTorch backend. ``build`` returns the native ``nn.Module`` (model.Gemma3ForCausalLM)."""

    name = "torch"

    def version(self) -> str:
        return torch.__version__

    def devices(self) -> list[str]:
        """cuda:0, cuda:1, ... then mps, then cpu: best first."""
        found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        if torch.backends.mps.is_available():
            found.append("mps")
        found.append("cpu")
        return found

    def resolve_device(self, device: str | None = None) -> torch.device:
        """The torch device for a device string (None = the best here). Raises BackendError naming the fix."""
        available = self.devices()
        if device is None:
            return torch.device(available[0])
        wanted = str(device).lower()
        if wanted == "cuda" and available[0].startswith("cuda"):
            wanted = "cuda:0"
        if wanted not in available:
            raise BackendError(
                f"device {device!r} is not available to the torch backend here: use one of "
                + ", ".join(available)
            )
        return torch.device(wanted)

    def build(
        self,
        config: Gemma3Config,
        weights: Mapping[str, np.ndarray] | None,
        *,
        dtype: str,
        device: str | None = None,
        partial: bool = False,
    ) -> Gemma3ForCausalLM:
        """The model in eval mode, parameters without gradients (``requires_grad_(True)`` to train).

        With ``weights=None`` it is built shape-only on the 'meta' device: no memory, instant at any size.
        With ``partial`` only the given weights are loaded, the others stay on 'meta' (gemmalab.stages).
        """
        torch_dtype = DTYPES[canonical_dtype(dtype)]
        with torch.device("meta"):
            model = Gemma3ForCausalLM(config)  # every parameter a shapeless placeholder, nothing allocated
        model.to(torch_dtype).eval().requires_grad_(False)
        model.resident = None  # None: every parameter (or, on 'meta', none); a partial model's names
        if weights is None:
            return model

        target = self.resolve_device(device)
        expected = parameter_shapes(config)
        # A quantized checkpoint's linears become the quantized wrapper holding the file's numbers, built
        # below; their dense weights stay on 'meta' until the wrapper replaces them: never allocated.
        quantized = quantized_linears(weights)
        if quantized and partial:
            raise BackendError("a partial (layer-streamed) model cannot hold quantized linears: use a dense checkpoint")
        expected = {name: shape for name, shape in expected.items() if name.removesuffix(".weight") not in quantized}
        if partial:
            model.resident = check_partial_names(config, weights)
            expected = {name: shape for name, shape in expected.items() if name in model.resident}
        missing = [name for name in expected if name not in weights]
        unexpected = [name for name in weights if name not in expected]
        if missing or unexpected:
            problems = [
                f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                for label, names in (("missing", missing), ("unexpected", unexpected))
                if names
            ]
            raise CheckpointError(
                f"weights do not match the config ({'; '.join(problems)}): use a checkpoint made for it"
            )
        for name, shape in expected.items():
            direct = isinstance(weights, Weights) and target.type == "cpu"
            if direct and weights.stored_dtype(name) == numpy_dtype(canonical_dtype(dtype)):
                # Read from the file straight into the parameter's memory: each tensor is held once (a
                # memory-mapped read would hold the file's pages as well, doubling the peak while loading).
                tensor = torch.empty(shape, dtype=torch_dtype)
                weights.read_into(name, to_numpy(tensor, writable=True))
            else:
                array = weights[name]  # a lazy Mapping may read it from disk only now
                if tuple(array.shape) != shape:
                    raise CheckpointError(
                        f"{name} has shape {tuple(array.shape)} but the config needs {shape}"
                    )
                tensor = to_torch(array, torch_dtype, target)
                del array
            module_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
        for name, entry in quantized.items():
            linears.wrap(model, [name], lambda _, name=name, entry=entry: QuantizedLinear.from_arrays(
                *weights.quantized_arrays(name), bits=entry.bits, group_size=entry.group_size,
                dtype=canonical_dtype(dtype), device=target))
        return model

    def logits(self, model: Gemma3ForCausalLM, ids: np.ndarray) -> np.ndarray:
        """float32 logits [batch, seq, vocab] for int token ids [batch, seq], every position."""
        ids = check_token_ids(ids, model.config.vocab_size)
        self._require_weights(model)
        with torch.inference_mode():
            out = model(torch.as_tensor(ids, dtype=torch.long, device=model.device)).logits
            logits = out.float().cpu().numpy()
        if model.dtype == torch.float16 and not np.isfinite(logits).all():
            raise BackendError(
                "float16 overflowed inside a layer (non-finite logits): run this model in bfloat16 or float32"
            )
        return logits

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
        ids = check_token_ids(ids, model.config.vocab_size)
        self._require_weights(model)
        device = model.device
        with torch.inference_mode():
            layer_masks = {kind: torch.as_tensor(np.ascontiguousarray(m[:, None]), device=device)
                           for kind, m in masks.items()}  # [batch, 1, seq, seq]
            out = model(torch.as_tensor(ids, dtype=torch.long, device=device),
                        positions=torch.as_tensor(np.ascontiguousarray(positions), dtype=torch.long, device=device),
                        mask=layer_masks, output_hidden_states=bool(hidden_states),
                        output_attentions=frozenset(attentions), logits_at=None if logits else NO_POSITIONS)
            picked = {i: hidden_state(out, i).float().cpu().numpy() for i in hidden_states}
            probs = {i: out.attentions[i].float().cpu().numpy() for i in attentions}
            head = out.logits.float().cpu().numpy() if logits else None
        return ForwardOutput(head, picked, probs)

    def logit_chunks(
        self, model: Gemma3ForCausalLM, ids: np.ndarray, *, chunk_tokens: int = 512
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(start, float32 logits [batch, n, vocab]) of every ``chunk_tokens`` positions: the backbone runs
        once, its final normed hidden states stay on the device, and the head (``logits_from_hidden``, with
        the soft-cap) runs per chunk (gemmalab.backend.Backend.logit_chunks)."""
        ids = check_token_ids(ids, model.config.vocab_size)
        chunk = check_chunk_tokens(chunk_tokens)
        self._require_weights(model)
        with torch.inference_mode():
            hidden = model.model(torch.as_tensor(ids, dtype=torch.long, device=model.device)).last_hidden_state
        return self._head_chunks(model, hidden, chunk)  # checked and run now; the chunks come as they are read

    def run_layers(self, model: Gemma3ForCausalLM, inputs: np.ndarray, *, layers: range, positions: np.ndarray,
                   masks: Mapping[str, np.ndarray]) -> np.ndarray:
        """The residual stream after blocks ``layers`` (Backend.run_layers): from int ids the scaled
        embedding first, else from the residual stream ``inputs``; in the residual dtype, as numpy."""
        layers, from_ids = check_run_layers(model.config, model.resident, inputs, layers)
        if model.resident is None:
            self._require_weights(model)
        device = _compute_device(model)
        with torch.inference_mode():
            if from_ids:
                ids = check_token_ids(inputs, model.config.vocab_size)
                x = model.model.embed(torch.as_tensor(ids, dtype=torch.long, device=device))
            else:
                x = to_torch(inputs, residual_dtype(model.dtype), device)
            layer_masks = {kind: torch.as_tensor(np.ascontiguousarray(m[:, None]), device=device)
                           for kind, m in masks.items()}  # [batch, 1, seq, seq]
            x = model.model.blocks(x, layers, positions=torch.as_tensor(np.ascontiguousarray(positions),
                                                                          dtype=torch.long, device=device),
                                   mask=layer_masks)
            return to_numpy(x)

    def head_chunks(self, model: Gemma3ForCausalLM, hidden: np.ndarray, *, chunk_tokens: int = 512
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """(start, float32 logits) per ``chunk_tokens`` positions of the residual stream after the last block
        (Backend.head_chunks): final norm, head and soft-cap, as logit_chunks does after its backbone."""
        chunk = check_head_chunks(model.config, model.resident, chunk_tokens)
        if model.resident is None:
            self._require_weights(model)
        with torch.inference_mode():
            x = to_torch(hidden, residual_dtype(model.dtype), _compute_device(model))
            normed = model.model.norm(x, dtype=model.dtype)
        return self._head_chunks(model, normed, chunk)

    def _head_chunks(self, model: Gemma3ForCausalLM, hidden: torch.Tensor, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, hidden.shape[1], chunk):
            with torch.inference_mode():
                logits = model.logits_from_hidden(hidden[:, start : start + chunk]).float().cpu().numpy()
            if model.dtype == torch.float16 and not np.isfinite(logits).all():
                raise BackendError(
                    "float16 overflowed inside a layer (non-finite logits): run this model in bfloat16 or float32"
                )
            yield start, logits  # [batch, n, vocab]

    def weights(self, model: Gemma3ForCausalLM) -> dict[str, np.ndarray]:
        """Every canonical parameter under its canonical name, in the model's dtype; the tied head once, as
        model.embed_tokens.weight; a wrapped linear as its wrapper's fused dense weight (linears.py), and
        nothing else of the wrapper. On CPU the plain ones are read-only views of the live parameters: copy
        them to keep a snapshot across training."""
        self._require_weights(model)
        return {name: to_numpy(tensor) for name, tensor in linears.dense_weights(model).items()}

    def num_parameters(self, model: Gemma3ForCausalLM) -> int:
        """Elements of the parameters the model holds (``parameter_shapes``): the tied matrix once, a
        wrapped linear's base weight and its wrapper's own parameters (so a wrapped model counts more than
        its config's ``num_parameters``)."""
        return sum(p.numel() for p in model.parameters())

    def parameter_shapes(self, model: Gemma3ForCausalLM) -> dict[str, tuple[int, ...]]:
        """Every parameter the model holds by name, with its shape: the canonical names, except that a
        wrapped linear's weight is ``<linear>.base.weight`` beside its wrapper's ``<linear>.<param>``."""
        return {name: tuple(p.shape) for name, p in linears.named_parameters(model).items()}

    def parameters(self, model: Gemma3ForCausalLM, names: Collection[str]) -> dict[str, np.ndarray]:
        """The parameters ``names`` (of ``parameter_shapes``) as numpy copies in the model's dtype."""
        held = linears.named_parameters(model)
        return {name: to_numpy(held[name]).copy() for name in checked_parameter_names(held, names)}

    def wrap(self, model: Gemma3ForCausalLM, names: Collection[str], kind: str, **options) -> list[str]:
        """Wrap the linears ``names`` (exact names) with the wrapper ``kind`` (gemmalab.linears.WRAPPER_KINDS),
        built with ``options``; returns the names wrapped."""
        cls = WRAPPERS[check_kind(kind)]
        return list(linears.wrap(model, names, lambda base: cls.from_base(base, **options),
                                 stack=kind in STACKING_KINDS))

    def fuse(self, model: Gemma3ForCausalLM) -> list[str]:
        """Fuse every wrapper back into a plain dense linear; returns the names fused."""
        return linears.fuse(model)

    # -- generation: KV caches and incremental forward passes ----------------------------------------------
    def new_cache(
        self, model: Gemma3ForCausalLM, *, batch: int, pad_lengths: list[int] | None = None
    ) -> KVCache:
        """An empty KV cache (cache.KVCache) for ``batch`` rows fed in lock-step; ``pad_lengths[r]`` left
        padding tokens at the start of row r are fed like others but never attended to. Buffers are
        allocated as tokens arrive: global layers grow with the sequence, local layers up to their window."""
        self._require_weights(model)
        batch, pad_lengths = check_cache_request(batch, pad_lengths)
        return KVCache(
            model.config, batch=batch, pad_lengths=pad_lengths, dtype=model.dtype, device=model.device
        )

    def extend(
        self, model: Gemma3ForCausalLM, cache: KVCache, ids: np.ndarray, *, logits: str = "last",
        positions: np.ndarray | None = None, mask: np.ndarray | None = None, write: int | None = None,
    ) -> np.ndarray | None:
        """Feed int ids [batch, n] after everything in ``cache`` (updated in place). float32 logits:
        "last" -> [batch, vocab] (the head runs on the last position only), "all" -> [batch, n, vocab],
        "none" -> None. ``positions``, ``mask`` (over the new tokens) and ``write`` follow the core's cache
        plan (gemmalab.cache_plan)."""
        check_logits_mode(logits)
        ids = self._ids_for_cache(model, cache, ids)
        cache.planner.request(positions=positions, mask=mask, write=write)
        with torch.inference_mode():
            tokens = torch.as_tensor(ids, dtype=torch.long).to(model.device)  # no copy for int64 on CPU
            hidden = model.model(tokens, cache=cache).last_hidden_state  # [batch, n, hidden]
            if logits == "none":
                return None
            if logits == "last":
                hidden = hidden[:, -1]  # [batch, hidden]: the head's one matmul runs on these rows only
            out = model.logits_from_hidden(hidden).float().cpu().numpy()  # [batch, (n,) vocab]
        if model.dtype == torch.float16 and not np.isfinite(out).all():
            raise BackendError(
                "float16 overflowed inside a layer (non-finite logits): run this model in bfloat16 or float32"
            )
        return out

    def extend_forward(
        self, model: Gemma3ForCausalLM, cache: KVCache, ids: np.ndarray, *,
        positions: np.ndarray | None = None, mask: np.ndarray | None = None, write: int | None = None,
        hidden_states: tuple[int, ...] = (), attentions: tuple[int, ...] = (),
    ) -> ForwardOutput:
        """``extend`` returning the logits of every new position and the captures asked for, the keys in
        the core's plan layout (gemmalab.backend.ForwardOutput): the step always follows the plan."""
        ids = self._ids_for_cache(model, cache, ids)
        plan = cache.planner.request_plan(ids.shape[1], positions=positions, mask=mask, write=write)
        with torch.inference_mode():
            tokens = torch.as_tensor(ids, dtype=torch.long).to(model.device)
            out = model.model(tokens, cache=cache, output_hidden_states=bool(hidden_states),
                              output_attentions=frozenset(attentions))
            logits = model.logits_from_hidden(out.last_hidden_state).float().cpu().numpy()  # [b, n, vocab]
            picked = {i: hidden_state(out, i).float().cpu().numpy() for i in hidden_states}
            probs = {i: out.attentions[i].float().cpu().numpy() for i in attentions}
        if model.dtype == torch.float16 and not np.isfinite(logits).all():
            raise BackendError(
                "float16 overflowed inside a layer (non-finite logits): run this model in bfloat16 or float32"
            )
        return ForwardOutput(logits, picked, probs, plan.key_positions(model.config.layer_types, attentions))

    def _ids_for_cache(self, model: Gemma3ForCausalLM, cache: KVCache, ids: np.ndarray) -> np.ndarray:
        """Checked token ids [cache.batch, n] to feed after what ``cache`` holds."""
        self._require_weights(model)
        if not isinstance(cache, KVCache):
            raise InputError(
                f"cache must come from the torch backend's new_cache, got {type(cache).__name__}"
            )
        same = cache.config is model.config or cache.config == model.config  # identity first: decoding is hot
        if not same or cache.dtype != model.dtype or cache.device != model.device:
            raise InputError("this cache was made for another model: make one with new_cache for this model")
        ids = check_token_ids(ids, model.config.vocab_size)
        if ids.shape[0] != cache.batch:
            raise InputError(f"this cache holds {cache.batch} rows but ids have {ids.shape[0]}")
        return ids

    def cache_nbytes(self, cache: KVCache) -> dict[str, int]:
        """Bytes of the key/value buffers the cache holds now, per layer type (0 for a type not present)."""
        return {"sliding_attention": 0, "full_attention": 0, **cache.nbytes()}

    def synchronize(self, model: Gemma3ForCausalLM) -> None:
        """Wait for queued work on the model's device (CUDA, MPS); CPU work is already done."""
        device = model.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    def peak_memory(self, model: Gemma3ForCausalLM) -> int | None:
        """CUDA: peak bytes allocated by tensors since the last reset (torch.cuda.max_memory_allocated).
        MPS: bytes the Metal driver holds for torch's allocator since the last reset, which emptied its
        cache: freed blocks stay held, so this is a high-water mark (an upper bound on the tensors' peak).
        CPU: None (torch does not track it)."""
        device = model.device
        if device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(device))
        if device.type == "mps":
            return int(torch.mps.driver_allocated_memory())
        return None

    def reset_peak_memory(self, model: Gemma3ForCausalLM) -> None:
        device = model.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        elif device.type == "mps":
            torch.mps.empty_cache()

    # -- training -------------------------------------------------------------------------------------------
    def trainer(self, model: Gemma3ForCausalLM, spec, companions: Mapping[str, Gemma3ForCausalLM] | None = None,
                loss_parameters: Mapping[str, np.ndarray] | None = None) -> Trainer:
        return Trainer(model, spec, companions, loss_parameters)

    def loss_sum(self, model: Gemma3ForCausalLM, inputs, targets, weights, *, chunk_tokens: int = LOSS_CHUNK_TOKENS,
                 label_smoothing: float = 0.0) -> float:
        self._require_weights(model)
        loss = LossSpec(head=(CrossEntropy(label_smoothing=label_smoothing),))
        batch = batch_arrays(model, prepare(model.config, loss, inputs, targets, weights))
        with torch.inference_mode():
            return float(chunked_loss_sum(model, batch, loss, chunk_tokens=chunk_tokens))

    @staticmethod
    def _require_weights(model: Gemma3ForCausalLM) -> None:
        if getattr(model, "resident", None) is not None:
            raise BackendError(partial_problem())
        if model.device.type == "meta":
            raise BackendError(
                "this model was built shape-only (weights=None): build it with weights to compute"
            )
