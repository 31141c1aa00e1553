"""Gemma 3 text-model configuration: presets, parsing of every HF ``config.json`` form, writing it back.

The config imports no array framework. The layer pattern is data (``layer_types``), and RoPE is described
per layer type, because that is where Gemma 3 differs from its peers:

* 5 local (sliding-window) layers for every global one; the pattern is read from ``layer_types`` when the
  checkpoint has it and derived from ``sliding_window_pattern`` (default 6) when it does not;
* local layers rotate with base 10k and no scaling, global layers with base 1M and, on 4B/12B/27B, linear
  scaling by 8 (positions divided by 8) -- on global layers only;
* attention scores are scaled by ``query_pre_attn_scalar ** -0.5``, which is *not* head_dim on 27B.

Three forms of ``config.json`` exist in the wild, and all parse here:

* transformers 4.x text configs: ``rope_theta``, ``rope_local_base_freq``, ``rope_scaling``,
  ``sliding_window_pattern``; the 4B+ multimodal configs are sparse and rely on Gemma3TextConfig defaults;
* transformers 5.x: ``layer_types`` and ``rope_parameters`` keyed by layer type;
* multimodal ``Gemma3ForConditionalGeneration`` configs, whose text model sits under ``text_config``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dtypes import canonical_dtype, round_to
from .errors import ConfigError, InputError

SLIDING = "sliding_attention"
FULL = "full_attention"

# Defaults of transformers' Gemma3TextConfig. Sparse configs (the 4B/12B/27B multimodal ones) rely on them,
# so a field absent from config.json takes exactly these values.
HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
}

_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer type: base frequency and linear position scaling factor."""

    theta: float
    factor: float = 1.0  # linear scaling: positions are divided by this (1.0 = no scaling)

    def inv_freq(self, head_dim: int):
        """Inverse frequencies, float64, shape [head_dim // 2] (the numpy reference and tests use these)."""
        import numpy as np

        exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
        return 1.0 / (self.theta**exponents) / self.factor


@dataclass(frozen=True)
class Gemma3Config:
    """Shape and numerics of a Gemma 3 text model. Frozen: derive variants with ``dataclasses.replace``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_local: RopeSpec = RopeSpec(10_000.0)
    rope_global: RopeSpec = RopeSpec(1_000_000.0)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131_072
    tie_word_embeddings: bool = True
    final_logit_softcapping: float | None = None
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int = 0
    stored_dtype: str | None = None  # the dtype the checkpoint's weights are stored in, when known
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- derived values --------------------------------------------------------------------------------
    @property
    def num_kv_groups(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def attention_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def rope(self, layer: int) -> RopeSpec:
        return self.rope_local if self.is_sliding(layer) else self.rope_global

    def embed_scale(self, dtype: str = "float32") -> float:
        """sqrt(hidden_size) rounded to ``dtype`` as transformers does (see dtypes.round_to)."""
        return round_to(math.sqrt(self.hidden_size), dtype)

    @property
    def sliding_window_pattern(self) -> int | None:
        """The period of the local/global pattern, when layer_types follows one (None when irregular)."""
        for period in range(1, self.num_hidden_layers + 1):
            expected = tuple(SLIDING if (i + 1) % period else FULL for i in range(self.num_hidden_layers))
            if expected == self.layer_types:
                return period
        return None

    def num_parameters(self) -> int:
        from .params import parameter_shapes

        return sum(math.prod(shape) for shape in parameter_shapes(self).values())

    def describe_layers(self) -> str:
        """The layer pattern as one line: L = local (sliding window), G = global."""
        return "".join("L" if t == SLIDING else "G" for t in self.layer_types)

    # -- validation ------------------------------------------------------------------------------------
    def validate(self) -> None:
        positive = (
            "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
            "num_key_value_heads head_dim sliding_window max_position_embeddings"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}: GQA needs whole groups"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}"
            )
        bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
        if bad:
            raise ConfigError(f"layer_types has unknown entries {bad}: use {SLIDING!r} or {FULL!r}")
        if not self.query_pre_attn_scalar or self.query_pre_attn_scalar <= 0:
            raise ConfigError(f"query_pre_attn_scalar={self.query_pre_attn_scalar!r} must be positive")
        if self.stored_dtype is not None:
            canonical_dtype(self.stored_dtype)

    # -- presets and parsing ---------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> Gemma3Config:
        """A named preset: gemma-3-270m, gemma-3-1b, gemma-3-4b, gemma-3-12b, gemma-3-27b, tiny, ..."""
        key = preset_key(name)
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return PRESETS[key]

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], *, source: str = "config.json") -> Gemma3Config:
        """Parse any of the three config.json forms (see the module docstring)."""
        return _parse_hf(raw, source)

    @classmethod
    def from_file(cls, path: str | Path) -> Gemma3Config:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: a Gemma 3 checkpoint folder needs a config.json")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not valid JSON ({err}): re-download or fix the file") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} holds a JSON {type(raw).__name__}, not an object: fix the file")
        return _parse_hf(raw, str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json for ``Gemma3ForCausalLM`` that transformers 4.5x, 5.x and mlx-lm all read.

        It carries the 5.x fields (``layer_types``, ``rope_parameters``) and the 4.x ones (``rope_theta``,
        ``rope_local_base_freq``, ``rope_scaling``, ``sliding_window_pattern``) side by side; they agree.
        """

        def rope_entry(spec: RopeSpec) -> dict[str, Any]:
            if spec.factor == 1.0:
                return {"rope_type": "default", "rope_theta": spec.theta}
            return {"rope_type": "linear", "factor": spec.factor, "rope_theta": spec.theta}

        # 4.x fields cannot express scaling on local layers; then only the 5.x rope_parameters carry it.
        legacy_ok = self.rope_local.factor == 1.0
        out: dict[str, Any] = {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": _int_if_whole(self.query_pre_attn_scalar),
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_parameters": {SLIDING: rope_entry(self.rope_local), FULL: rope_entry(self.rope_global)},
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "final_logit_softcapping": self.final_logit_softcapping,
            "attn_logit_softcapping": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
        }
        if legacy_ok:
            out["rope_theta"] = self.rope_global.theta
            out["rope_local_base_freq"] = self.rope_local.theta
            out["rope_scaling"] = (
                None
                if self.rope_global.factor == 1.0
                else {"rope_type": "linear", "factor": self.rope_global.factor}
            )
            if self.sliding_window_pattern is not None:
                out["sliding_window_pattern"] = self.sliding_window_pattern
        if self.stored_dtype is not None:
            out["torch_dtype"] = self.stored_dtype
            out["dtype"] = self.stored_dtype
        return out

    def with_dtype(self, dtype: str | None) -> Gemma3Config:
        return dataclasses.replace(self, stored_dtype=None if dtype is None else canonical_dtype(dtype))


def preset_key(name: str) -> str:
    """The PRESETS key a name refers to: case-insensitive, with or without google/ and the -it/-pt suffix."""
    return name.lower().removeprefix("google/").removesuffix("-it").removesuffix("-pt")


def _int_if_whole(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _pattern_layer_types(num_layers: int, pattern: int) -> tuple[str, ...]:
    # Layer i is global when (i + 1) is a multiple of the pattern: L L L L L G L L L L L G ...
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))


def _rope_from_entry(entry: Any, default_theta: float, where: str) -> RopeSpec:
    if entry is None:
        return RopeSpec(default_theta)
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be an object with rope_type/rope_theta/factor, got {entry!r}")
    kind = entry.get("rope_type", entry.get("type", "default"))
    theta = float(entry.get("rope_theta", default_theta))
    if kind == "default":
        return RopeSpec(theta)
    if kind == "linear":
        factor = entry.get("factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise ConfigError(f"{where} is linear RoPE scaling without a positive 'factor': add one")
        return RopeSpec(theta, float(factor))
    raise ConfigError(
        f"{where} uses rope_type {kind!r}; Gemma 3 uses 'default' or 'linear' (other scalings are not supported)"
    )


def _parse_hf(raw: Mapping[str, Any], source: str) -> Gemma3Config:
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if "text_config" in raw or model_type == "gemma3":
        if model_type not in (None, "gemma3"):
            raise ConfigError(f"{source}: model_type {model_type!r} is not Gemma 3 (expected 'gemma3' or 'gemma3_text')")
        text = raw.get("text_config") or {}
        if not isinstance(text, Mapping):
            raise ConfigError(f"{source}: text_config must be an object")
        where = f"{source} (text_config)"
        # The wrapper's dtype and special ids (the 4B+ configs keep eos [1, 106] at the top) apply to the
        # text model when its own config leaves them out.
        inherited = ("torch_dtype", "dtype", "eos_token_id", "bos_token_id", "pad_token_id")
        text = {**{k: raw[k] for k in inherited if raw.get(k) is not None}, **text}
    elif model_type == "gemma3_text" or (model_type is None and "Gemma3ForCausalLM" in architectures):
        text, where = raw, source
    else:
        found = model_type or (architectures[0] if architectures else "none")
        raise ConfigError(
            f"{source}: model_type {found!r} is not Gemma 3: gemmalab loads gemma3_text and gemma3 checkpoints"
        )
    text_type = text.get("model_type")
    if text_type not in (None, "gemma3_text"):
        raise ConfigError(f"{where}: model_type {text_type!r} is not gemma3_text")

    def get(key: str) -> Any:
        value = text.get(key)
        return HF_TEXT_DEFAULTS[key] if value is None and key in HF_TEXT_DEFAULTS else value

    if text.get("use_bidirectional_attention"):
        raise ConfigError(f"{where}: use_bidirectional_attention is an embedding model (EmbeddingGemma), not a causal LM")
    if text.get("attn_logit_softcapping") is not None:
        raise ConfigError(f"{where}: attn_logit_softcapping is Gemma 2's; Gemma 3 has none: set it to null")
    if text.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true is not Gemma 3 (its projections have no bias)")
    activation = get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in _ACTIVATIONS:
        raise ConfigError(f"{where}: hidden_activation {activation!r} is not Gemma's gelu_pytorch_tanh")

    num_layers = get("num_hidden_layers")
    layer_types = text.get("layer_types")
    if layer_types is None:
        pattern = text.get("sliding_window_pattern", text.get("_sliding_window_pattern")) or 6
        if not isinstance(pattern, int) or pattern < 1:
            raise ConfigError(f"{where}: sliding_window_pattern={pattern!r} must be a positive integer")
        layer_types = _pattern_layer_types(num_layers, pattern)

    # RoPE: 5.x rope_parameters keyed by layer type, else the 4.x fields.
    rope_parameters = text.get("rope_parameters")
    if isinstance(rope_parameters, Mapping) and (SLIDING in rope_parameters or FULL in rope_parameters):
        rope_local = _rope_from_entry(
            rope_parameters.get(SLIDING), float(get("rope_local_base_freq")), f"{where} rope_parameters.{SLIDING}"
        )
        rope_global = _rope_from_entry(
            rope_parameters.get(FULL), float(get("rope_theta")), f"{where} rope_parameters.{FULL}"
        )
    else:
        # A flat rope_parameters (or 4.x rope_scaling) applies to global layers only, as in transformers.
        scaling = rope_parameters if isinstance(rope_parameters, Mapping) else text.get("rope_scaling")
        global_theta = float(text.get("rope_theta") or (scaling or {}).get("rope_theta") or HF_TEXT_DEFAULTS["rope_theta"])
        rope_local = RopeSpec(float(get("rope_local_base_freq")))
        rope_global = _rope_from_entry(
            {**(scaling or {}), "rope_theta": global_theta}, global_theta, f"{where} rope_scaling"
        )

    eos = get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    dtype = text.get("dtype") or text.get("torch_dtype")
    try:
        stored_dtype = canonical_dtype(dtype) if dtype is not None else None
    except InputError:
        raise ConfigError(f"{where}: dtype {dtype!r} is not float32, bfloat16 or float16") from None

    try:
        return Gemma3Config(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=get("num_attention_heads"),
            num_key_value_heads=get("num_key_value_heads"),
            head_dim=get("head_dim"),
            query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
            sliding_window=get("sliding_window"),
            layer_types=tuple(layer_types),
            rope_local=rope_local,
            rope_global=rope_global,
            rms_norm_eps=float(get("rms_norm_eps")),
            max_position_embeddings=get("max_position_embeddings"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", get("tie_word_embeddings"))),
            final_logit_softcapping=get("final_logit_softcapping"),
            bos_token_id=get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=get("pad_token_id"),
            stored_dtype=stored_dtype,
            name=raw.get("_name_or_path") or None,
        )
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: a field has the wrong type ({err}): fix config.json") from None


def _preset(
    name: str,
    *,
    hidden: int,
    mlp: int,
    layers: int,
    heads: int,
    kv_heads: int,
    window: int,
    vocab: int,
    head_dim: int = 256,
    query_pre_attn_scalar: float = 256,
    global_factor: float = 1.0,
    max_positions: int = 131_072,
    eos: tuple[int, ...] = (1, 106),
) -> Gemma3Config:
    return Gemma3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=query_pre_attn_scalar,
        sliding_window=window,
        layer_types=_pattern_layer_types(layers, 6),
        rope_local=RopeSpec(10_000.0),
        rope_global=RopeSpec(1_000_000.0, global_factor),
        max_position_embeddings=max_positions,
        eos_token_ids=eos,
        stored_dtype="bfloat16",
        name=name,
    )


# Published shapes. Sources: the config.json of each google/gemma-3-* checkpoint on the Hugging Face Hub
# (text_config for the multimodal 4B/12B/27B) and the Gemma 3 Technical Report (arXiv:2503.19786), Table 1.
# eos (1, 106) are <eos> and <end_of_turn>, the stop ids in the instruction-tuned generation_config.json.
PRESETS: dict[str, Gemma3Config] = {
    "gemma-3-270m": _preset("gemma-3-270m", hidden=640, mlp=2048, layers=18, heads=4, kv_heads=1, window=512,
                            vocab=262_144, max_positions=32_768),
    "gemma-3-1b": _preset("gemma-3-1b", hidden=1152, mlp=6912, layers=26, heads=4, kv_heads=1, window=512,
                          vocab=262_144, max_positions=32_768),
    "gemma-3-4b": _preset("gemma-3-4b", hidden=2560, mlp=10240, layers=34, heads=8, kv_heads=4, window=1024,
                          vocab=262_208, global_factor=8.0),
    "gemma-3-12b": _preset("gemma-3-12b", hidden=3840, mlp=15360, layers=48, heads=16, kv_heads=8, window=1024,
                           vocab=262_208, global_factor=8.0),
    "gemma-3-27b": _preset("gemma-3-27b", hidden=5376, mlp=21504, layers=62, heads=32, kv_heads=16, window=1024,
                           vocab=262_208, head_dim=128, query_pre_attn_scalar=168, global_factor=8.0),
    # Tiny shapes for tests and quick experiments: 6+ layers so the 5:1 pattern shows, a window short
    # enough that test sequences outrun it, GQA, query_pre_attn_scalar != head_dim, scaled global RoPE.
    # `tiny` has the byte-level vocabulary (gemmalab.tokenizer.BYTE_LEVEL_VOCAB_SIZE = 261 ids; eos and
    # <end_of_turn> are 1 and 4 there), so it trains on raw text with no tokenizer download.
    "tiny": _preset("tiny", hidden=64, mlp=128, layers=6, heads=4, kv_heads=2, window=8, vocab=261,
                    head_dim=16, query_pre_attn_scalar=24, global_factor=8.0, max_positions=4096, eos=(1, 4)),
    "tiny-mqa": _preset("tiny-mqa", hidden=48, mlp=96, layers=7, heads=2, kv_heads=1, window=5, vocab=300,
                        head_dim=32, query_pre_attn_scalar=32, max_positions=4096),
}


def resolve_config(source: str | Path | Mapping[str, Any] | Gemma3Config) -> Gemma3Config:
    """A config from a preset name, a folder or config.json path, a parsed dict, or a config."""
    if isinstance(source, Gemma3Config):
        return source
    if isinstance(source, Mapping):
        return Gemma3Config.from_hf_dict(source, source="<dict>")
    text = str(source)
    key = preset_key(text)
    if key in PRESETS and not Path(text).exists():
        return PRESETS[key]
    if not Path(text).exists() and "/" not in text and not text.endswith(".json"):
        raise ConfigError(f"{text!r} is neither a preset nor a folder: choose a preset ({', '.join(PRESETS)}) "
                          "or pass a checkpoint folder")
    return Gemma3Config.from_file(text)
