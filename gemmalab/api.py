"""The Python API: ``gemmalab.load`` and the numpy-speaking ``Model`` handle.

    >>> import gemmalab
    >>> model = gemmalab.load("google/gemma-3-270m", backend="torch", dtype="float32")
    >>> logits = model.logits([[2, 651, 6037]])        # float32 [batch, seq, vocab]
    >>> model.save("my-copy")                           # HF layout: transformers and mlx-lm load it

The backend-native module stays reachable as ``model.native`` (a torch.nn.Module, an mlx.nn.Module, ...).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint
from .backend import Backend, ForwardOutput, get_backend, resolve_backend_name
from .checks import check_token_ids
from .config import Gemma3Config, resolve_config
from .dtypes import canonical_dtype
from .errors import BackendError, InputError
from .lora import Adapter, LoraConfig
from .params import init_weights
from .tokenizer import BYTE_LEVEL_VOCAB_SIZE, Tokenizer


@dataclass
class StreamChunk:
    """One streamed token: its id, the text it adds, and whether it is the stop id that ends the stream."""

    token: int
    text: str
    is_stop: bool = False


@dataclass(eq=False)
class Cache:
    """A KV cache of one ``Model`` (``Model.new_cache``), fed by ``Model.extend``. ``native`` is the backend's
    own cache object; ``length`` counts the tokens stored so far per row (left padding included): the next
    token gets that index."""

    model: Model = field(repr=False)
    native: Any = field(repr=False)
    batch: int
    pad_lengths: tuple[int, ...]
    length: int = 0


@dataclass
class Model:
    """A Gemma 3 text model on one backend. Methods take and return numpy (or plain Python) values."""

    config: Gemma3Config
    backend: str
    dtype: str
    native: Any
    tokenizer: Tokenizer | None = None
    source: Path | None = None
    generation_eos: tuple[int, ...] | None = None  # eos ids from generation_config.json, when it has them
    lora: LoraConfig | None = None  # the LoRA or DoRA adapter's settings, while one is attached (add_adapter)
    adapted: tuple[str, ...] = ()  # the linears that adapter wraps

    @property
    def _backend(self) -> Backend:
        return get_backend(self.backend)

    def logits(self, ids: Any) -> np.ndarray:
        """float32 logits [batch, seq, vocab] for token ids [batch, seq] (a [seq] list is taken as batch 1)."""
        array = np.asarray(ids)
        if array.ndim == 1:
            array = array[None, :]
        return self._backend.logits(self.native, check_token_ids(array, self.config.vocab_size))

    def forward(
        self,
        ids: Any,
        *,
        positions: Any = None,
        mask: Any = None,
        hidden_states: bool | Sequence[int] = False,
        attentions: bool | Sequence[int] | None = None,
        logits: bool = True,
    ) -> ForwardOutput:
        """One pass over token ids [batch, seq] (a [seq] list is batch 1), with what the model computes
        inside it, as numpy float32. ``logits=False`` skips the output head (``.logits`` is None): the
        cheap way to read hidden states alone, at a 262k vocabulary.

        ``positions``: [seq] or [batch, seq] (default 0..seq-1); they drive RoPE and the masks. ``mask``:
        boolean [seq, seq] or [batch, seq, seq], True where a query may attend to a key (the convention of
        scaled_dot_product_attention); it replaces the causal rule, and local layers keep their sliding
        window on top, from the positions (gemmalab.masks). ``hidden_states``: True for all or a list of
        indices, in transformers' convention (0 = the scaled embeddings, i = the output of block i - 1, the
        last = after the final norm). ``attentions``: True or a list of layer indices whose probabilities
        [batch, heads, query, key] to return; every other layer keeps the fused attention kernel.
        Returns a ForwardOutput: ``.logits`` [batch, seq, vocab], ``.hidden_states`` and ``.attentions``
        as dicts by index."""
        from . import masks as mask_rules
        from .checks import check_selection

        array = np.asarray(ids)
        if array.ndim == 1:
            array = array[None, :]
        array = check_token_ids(array, self.config.vocab_size)
        batch, seq = array.shape
        at = mask_rules.as_positions(positions, batch, seq)
        explicit = None if mask is None else mask_rules.as_mask(mask, batch, seq, seq)
        per_type = mask_rules.layer_masks(self.config, at, explicit)
        mask_rules.check_every_query_sees_a_key(per_type)
        layers = self.config.num_hidden_layers
        return self._backend.forward(
            self.native, array, positions=np.ascontiguousarray(at), masks=per_type,
            hidden_states=check_selection(hidden_states, layers + 1, "hidden_states"),
            attentions=check_selection(attentions, layers, "attentions"), logits=bool(logits),
        )

    def new_cache(self, batch: int = 1, pad_lengths: Sequence[int] | None = None) -> Cache:
        """An empty KV cache for ``batch`` sequences fed in lock-step by ``extend``. ``pad_lengths[r]`` is the
        number of left-padding tokens at the start of row r: fed like the others, never attended to, and
        row r's positions count from its first real token."""
        from .checks import check_cache_request

        batch, pads = check_cache_request(batch, pad_lengths)
        native = self._backend.new_cache(self.native, batch=batch, pad_lengths=pads)
        return Cache(self, native, batch, tuple(pads or [0] * batch))

    def extend(
        self,
        cache: Cache,
        ids: Any,
        *,
        positions: Any = None,
        mask: Any = None,
        write: int | None = None,
        hidden_states: bool | Sequence[int] = False,
        attentions: bool | Sequence[int] | None = None,
    ) -> ForwardOutput:
        """Feed token ids [batch, n] (a [n] list is batch 1) after everything ``cache`` holds, updating it,
        and return what ``forward`` returns, for the n new tokens only: ``.logits`` [batch, n, vocab],
        ``.hidden_states`` [batch, n, hidden] and ``.attentions`` [batch, heads, n, keys] by index.

        ``positions`` ([n] or [batch, n]; default: each row's next positions) drive RoPE and the masks.
        ``mask`` (boolean [n, n] or [batch, n, n], True = may attend) replaces the causal rule among the new
        tokens; they see the cached tokens by position (not after their own), local layers keep their
        window on top. ``write=k`` stores only the first k new tokens (0: look without storing). The rule
        is the core's cache plan (gemmalab.cache_plan). ``hidden_states`` and ``attentions`` select as in
        ``forward``. The key axis of ``.attentions[i]`` is the cache's slots as they were before this step,
        in slot order (on local layers a ring of sliding_window slots: once it has wrapped, not position
        order), then the n new tokens; ``.key_positions[i]`` [batch, keys] gives the position each key
        holds (-1 for padding). Generation keeps its own faster path (``generate``)."""
        from .checks import check_selection

        if not isinstance(cache, Cache):
            raise InputError(f"cache must come from Model.new_cache, got {type(cache).__name__}")
        if cache.model is not self:
            raise InputError("this cache belongs to another model: make one with this model's new_cache")
        array = np.asarray(ids)
        if array.ndim == 1:
            array = array[None, :]
        array = check_token_ids(array, self.config.vocab_size)
        if array.shape[0] != cache.batch:
            raise InputError(
                f"this cache holds {cache.batch} rows but ids have {array.shape[0]}: give one row each"
            )
        layers = self.config.num_hidden_layers
        out = self._backend.extend_forward(
            self.native, cache.native, array, positions=positions, mask=mask, write=write,
            hidden_states=check_selection(hidden_states, layers + 1, "hidden_states"),
            attentions=check_selection(attentions, layers, "attentions"),
        )
        cache.length += array.shape[1] if write is None else int(write)
        return out

    def weights(self) -> dict[str, np.ndarray]:
        """Every parameter under its HF name, as numpy in the model's dtype; wrapped linears fused."""
        return self._backend.weights(self.native)

    def num_parameters(self) -> int:
        """Elements of the parameters the model holds: the config's count, plus wrappers' own parameters."""
        return self._backend.num_parameters(self.native)

    def wrap(self, kind: str, names: str | Sequence[str], **options: Any) -> list[str]:
        """Wrap linear layers with the wrapper ``kind`` (gemmalab.linears.WRAPPER_KINDS) built with
        ``options``; returns the full names wrapped. ``names`` are endings of linear names, as
        gemmalab.linears.select takes them (``["q_proj", "v_proj"]``, ``"model.layers.3.mlp.up_proj"``),
        or the full names select gave for layers or a predicate. ``weights`` and ``save`` keep giving the
        dense HF tensors (each wrapper fused)."""
        from .linears import check_kind, select

        if kind in ("lora", "dora"):  # their tensors differ per linear: an Adapter holds them
            raise InputError(f"attach a {kind} adapter with Model.add_adapter(gemmalab.lora.fresh_adapter(LoraConfig(...), "
                             "model.config, seed, model.weights())), not Model.wrap")
        return self._backend.wrap(self.native, select(self.config, names), check_kind(kind), **options)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter the model holds, by the name its trainer uses: the canonical names, except that a
        wrapped linear's weight is ``<linear>.base.weight`` and its wrapper's own are ``<linear>.<param>``."""
        return self._backend.parameter_shapes(self.native)

    # -- adapters (gemmalab.lora; files: gemmalab.adapters) -------------------------------------------------
    def add_adapter(self, adapter: Adapter, *, dropout: float | None = None) -> list[str]:
        """Attach a LoRA or DoRA ``adapter`` (gemmalab.lora.Adapter: settings and numpy tensors) by wrapping
        each linear it adapts; returns their names. ``weights`` and ``save`` then give the merged dense tensors;
        ``adapter()`` gives the adapter back, ``fuse()`` merges it for good. One adapter at a time."""
        from .lora import wrap_adapter

        if self.lora is not None:
            raise InputError("the model already has an adapter: fuse() it first, or load the base again")
        names = wrap_adapter(self._backend, self.native, self.config, adapter, dropout=dropout)
        self.lora, self.adapted = adapter.config, tuple(names)
        return names

    def adapter(self) -> Adapter:
        """The attached adapter as numpy (its settings and each adapted linear's tensors, float32)."""
        from .lora import attached_adapter

        if self.lora is None:
            raise InputError("the model has no adapter: add_adapter(), or gemmalab.load(BASE, adapter=DIR)")
        return attached_adapter(self._backend, self.native, self.lora, self.adapted)

    def fuse(self) -> list[str]:
        """Fuse every wrapper (an adapter's included) back into its dense linear; returns the names fused."""
        done = self._backend.fuse(self.native)
        self.lora, self.adapted = None, ()
        return done

    def save(self, folder: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False) -> Path:
        """Save in the Hugging Face Gemma3ForCausalLM layout (safetensors + config.json + tokenizer files)."""
        target = canonical_dtype(dtype) if dtype else self.dtype
        out = checkpoint.save_checkpoint(
            folder, self.config.with_dtype(target), self.weights(), copy_from=self.source, overwrite=overwrite
        )
        if self.tokenizer is not None and self.source is None:  # an in-memory tokenizer (byte-level)
            self.tokenizer.save(out)
        return out

    # -- generation ---------------------------------------------------------------------------------------
    def _generator(self, prompt: Any, *, stop: Sequence[int | str] | None, prefill_chunk: int, track_text: bool = False,
                   **sampling: Any):
        from .generation import Generator, normalize_prompts, split_stops, stop_ids_for
        from .sampling import SamplingParams

        rows, batched = normalize_prompts(prompt, self.tokenizer)
        stop_ids, stop_strings = split_stops(stop)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        gen = Generator(
            self._backend,
            self.native,
            self.config,
            rows,
            params=SamplingParams(**sampling),
            stop_ids=stop_ids_for(self.config, self.generation_eos, stop_ids),
            prefill_chunk=prefill_chunk,
            pad_id=pad,
            stop_strings=stop_strings,
            tokenizer=self.tokenizer,
            track_text=track_text,
        )
        return gen, batched

    def generate(
        self,
        prompt: Any,
        max_tokens: int = 256,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[int | str] | None = None,
        prefill_chunk: int = 512,
    ):
        """Continue ``prompt`` (a string, a list of token ids, or a list of either for a batch).

        Greedy when temperature is 0. Stops at the eos ids of generation_config.json (or the config's),
        plus ``stop``: token ids (int) and stop strings (str; the text ends before the string). Returns a
        GenerationResult: ``.tokens`` (new ids), ``.text`` (when there is a tokenizer),
        ``.finish_reasons``, ``.stats`` (time to first token, tokens/s).
        """
        from .generation import generate_ids

        gen, _ = self._generator(
            prompt, stop=stop, prefill_chunk=prefill_chunk, temperature=temperature, top_k=top_k,
            top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
        )
        result = generate_ids(gen, max_tokens)
        if self.tokenizer is not None and result.texts is None:
            result.texts = [self.tokenizer.decode(row) for row in result.token_rows]
        return result

    def stream(
        self,
        prompt: Any,
        max_tokens: int = 256,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[int | str] | None = None,
        prefill_chunk: int = 512,
        stats: Any = None,
    ) -> Iterator[StreamChunk]:
        """Yield each new token of a single prompt as it comes: StreamChunk(token, text), where text is the
        new piece of decoded text ('' while a multi-byte character is incomplete, while the text might be
        the start of a stop string, or without a tokenizer). The chunks' texts add up to ``generate``'s.
        Pass a GenerationStats as ``stats`` to read the timings afterwards."""
        from .generation import GenerationStats, decode_steps

        gen, batched = self._generator(
            prompt, stop=stop, prefill_chunk=prefill_chunk, temperature=temperature, top_k=top_k,
            top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, track_text=True,
        )
        if batched:
            raise InputError("stream takes one prompt; use generate for a batch")
        text_of = gen.row_texts[0] if gen.row_texts is not None else None
        for step in decode_steps(gen, max_tokens, stats if stats is not None else GenerationStats()):
            token = step.tokens[0]
            if token is None:
                return
            stopping = step.finished[0]
            text = ""
            if text_of is not None:
                # once the row ends, what was held back as the possible start of a stop string is text
                text = text_of.take() + (text_of.flush() if stopping or step.last else "")
            yield StreamChunk(token, text, stopping)

    def chat(self, messages: Sequence[Mapping[str, Any]], max_tokens: int = 512, **kwargs: Any):
        """Reply to a conversation ([{"role": "user", "content": ...}, ...]) in Gemma's turn format."""
        if self.tokenizer is None:
            raise InputError("chat needs a tokenizer, and this model has none: load a checkpoint that ships one")
        return self.generate(self.tokenizer.apply_chat(messages), max_tokens, **kwargs)

    def __repr__(self) -> str:
        name = self.config.name or (self.source.name if self.source else "gemma3")
        return f"Model({name!r}, backend={self.backend!r}, dtype={self.dtype!r}, params={self.config.num_parameters():,})"


def load(
    source: str | os.PathLike,
    backend: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    *,
    revision: str | None = None,
    adapter: str | os.PathLike | None = None,
    **backend_options: Any,
) -> Model:
    """Load a Gemma 3 checkpoint: a local folder, a cached Hub repo id, or one to download.

    ``adapter``: a LoRA or DoRA adapter to attach (``Model.add_adapter``): a PEFT or mlx-lm adapter folder, or
    the checkpoint of a ``gemmalab train --lora`` run (gemmalab.adapters.read_adapter).

    ``backend``: mlx, torch, jax or auto (default: $GEMMALAB_BACKEND, else auto).
    ``dtype``: float32, bfloat16 or float16 (default: the dtype the checkpoint is stored in, else float32).
    ``device``: a backend device name such as cuda:0, mps, cpu (default: the backend's best).
    ``backend_options``: passed to the backend's build, e.g. ``mesh={"data": 2, "model": 4}`` on JAX.

    A quantized checkpoint (mlx-lm's format: ``gemmalab convert --quantize`` or ``mlx_lm.convert -q``;
    gemmalab.checkpoint) loads on every backend: each quantized linear becomes the backend's ``quantized``
    wrapper holding exactly the file's codes, scales and biases (nothing re-quantized, no dense copy made;
    scales and biases in ``dtype``). A quantized embedding is dequantized into the dense embedding, which is
    also the tied head (a quantized tied head is later work). ``weights()`` and ``save`` give the dense
    dequantized tensors.
    """
    folder = checkpoint.locate(source, revision=revision)
    config = checkpoint.load_config(folder)
    weights = checkpoint.read_weights(folder, config, quantized=True)
    chosen_dtype = canonical_dtype(dtype) if dtype else (config.stored_dtype or "float32")
    name = resolve_backend_name(backend)
    attached = None
    if adapter is not None:  # read and checked before the model is built: a bad adapter costs no load
        from .adapters import read_adapter

        attached = read_adapter(adapter).check(config)
    native = _build(name, config, weights, chosen_dtype, device, backend_options)
    model = Model(
        config, name, chosen_dtype, native, Tokenizer.from_folder(folder), folder, checkpoint.generation_eos_ids(folder)
    )
    if attached is not None:
        model.add_adapter(attached)
    return model


def init(
    config: str | Gemma3Config,
    backend: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    *,
    seed: int = 0,
    **backend_options: Any,
) -> Model:
    """A randomly initialised model from a preset name (gemma-3-270m, tiny, ...) or a config.

    Weights are drawn in numpy from ``seed``, so every backend starts from the same numbers.
    """
    cfg = resolve_config(config)
    chosen_dtype = canonical_dtype(dtype or "float32")
    name = resolve_backend_name(backend)
    weights = init_weights(cfg, seed=seed, dtype="float32")
    native = _build(name, cfg, weights, chosen_dtype, device, backend_options)
    return Model(cfg, name, chosen_dtype, native, preset_tokenizer(cfg))


def preset_tokenizer(config: Gemma3Config) -> Tokenizer | None:
    """The tokenizer of a randomly initialised model: byte-level when its vocabulary is exactly the
    byte-level one (the `tiny` preset), else none (a preset alone does not say which tokenizer it had)."""
    return Tokenizer.byte_level() if config.vocab_size == BYTE_LEVEL_VOCAB_SIZE else None


def _build(name: str, config: Gemma3Config, weights: Any, dtype: str, device: str | None, options: dict) -> Any:
    """The backend's build, with backend-specific options passed only when there are some."""
    backend = get_backend(name)
    if not options:
        return backend.build(config, weights, dtype=dtype, device=device)
    try:
        return backend.build(config, weights, dtype=dtype, device=device, **options)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        raise BackendError(
            f"backend {name!r} does not take the option(s) {', '.join(options)}: drop them or choose another backend"
        ) from None


def backends() -> list[str]:
    """Names of the installed, usable backends."""
    from .backend import available_backends

    return available_backends()
