"""The linear layers of a Gemma 3 model by Hugging Face name, which of them to wrap, and how wrappers are named.

Wrappers (LoRA and its relatives, quantized linears, the learned output scale here) replace a linear layer
through a walker and ``fuse`` back into a plain dense one; the model file never changes for them. This
module is the framework-free part of that mechanism:

* ``linears(config)``: every linear of a config, in checkpoint order (``params.parameter_shapes``), named by
  its module path (``model.layers.3.self_attn.q_proj``; its weight is that name + ``.weight``). The output
  head is ``lm_head`` when the config unties it; when tied, it is the embedding ``model.embed_tokens``,
  listed first (where the checkpoint has it) and flagged ``tied``: it cannot be wrapped, because the same
  matrix is also the input embedding, and a wrapped head would be a second, different matrix.
* ``select(config, ...)``: names by ending (``"q_proj"``, ``"mlp.up_proj"``, a full name), by block index,
  or by a predicate; ``check_wrappable`` validates names handed to a walker.
* how wrapper parameters are named in a backend (``BASE``): a wrapper that keeps the linear it wraps holds
  it as its child ``base``, so the frozen dense weight is ``<linear>.base.weight`` and the wrapper's own
  parameters are ``<linear>.<param>`` (``model.layers.0.self_attn.q_proj.scale``). ``weights()`` and saved
  checkpoints never show these: they give the canonical dense tensors, each wrapper fused.
* each wrapper's merge rule in numpy (``output_scale`` here; LoRA and DoRA in gemmalab.lora): the
  specification the backends' ``fuse`` follow.

The walkers themselves (``linears``, ``wrap``, ``fuse``, ``named_parameters``) are backend code, with the
same names on every backend: ``gemmalab_<backend>.linears``; the wrappers are in
``gemmalab_<backend>.wrappers``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import numpy as np

from .checks import is_count
from .config import Gemma3Config
from .errors import InputError
from .params import EMBED, LM_HEAD, parameter_shapes

BASE = "base"  # the child under which a wrapper keeps the linear it wraps: <linear>.base.weight
# The wrappers every backend implements, by the name the core dispatches on (Backend.wrap, Model.wrap).
WRAPPER_KINDS = ("output_scale", "lora", "dora", "quantized")
# Those that may wrap a linear that is wrapped already (an adapter over a quantized linear: QLoRA), once.
STACKING_KINDS = ("lora", "dora")

EMBEDDING = EMBED.removesuffix(".weight")  # "model.embed_tokens"
HEAD = LM_HEAD.removesuffix(".weight")  # "lm_head"
_LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer: ``y = x @ W.T`` with W [out_features, in_features] stored as ``name + ".weight"``."""

    name: str  # module path, e.g. "model.layers.3.self_attn.q_proj", "lm_head", "model.embed_tokens"
    in_features: int
    out_features: int
    layer: int | None  # decoder block index; None for the output head
    tied: bool = False  # the output head that is the embedding matrix (cannot be wrapped)

    @property
    def kind(self) -> str:
        """The last part of the name: "q_proj" ... "down_proj", "lm_head" or "embed_tokens"."""
        return self.name.rpartition(".")[2]

    @property
    def weight(self) -> str:
        """The canonical name of its weight, e.g. "model.layers.3.self_attn.q_proj.weight"."""
        return self.name + ".weight"


def linears(config: Gemma3Config) -> dict[str, LinearSpec]:
    """Every linear of ``config`` by name, in checkpoint order (gemmalab.params.parameter_shapes): the tied
    head (the embedding, flagged ``tied``) first when the head is tied, then per block q, k, v, o, gate, up,
    down, then ``lm_head`` when untied."""
    out = {}
    for weight, shape in parameter_shapes(config).items():
        name = weight.removesuffix(".weight")
        kind = name.rpartition(".")[2]
        if name == EMBEDDING:
            if config.tie_word_embeddings:  # the embedding is a linear only as the tied head
                out[name] = LinearSpec(name, shape[1], shape[0], None, tied=True)
        elif name == HEAD:
            out[name] = LinearSpec(name, shape[1], shape[0], None)
        elif kind in _LINEAR_KINDS:
            out[name] = LinearSpec(name, shape[1], shape[0], int(name.split(".")[2]))
    return out


def _matches(name: str, ending: str) -> bool:
    return name == ending or name.endswith("." + ending)


def _tied_message(name: str) -> str:
    return (
        f"{name} is the tied output head: its matrix is also the input embedding, so it cannot be wrapped; "
        "wrap the blocks' linears, or use a config with tie_word_embeddings=False (an lm_head of its own)"
    )


def select(
    config: Gemma3Config,
    names: str | Iterable[str] | None = None,
    *,
    layers: int | Iterable[int] | None = None,
    where: Callable[[LinearSpec], bool] | None = None,
) -> list[str]:
    """Names of the linears that meet every criterion given, in checkpoint order.

    ``names``: endings of names (a linear matches one when it is that name or ends with "." + it):
    ``["q_proj", "v_proj"]``, ``"mlp.up_proj"``, ``"lm_head"``, ``"model.layers.3.self_attn.o_proj"``;
    each must match some linear. ``layers``: block indices (negative ones count from the end); the head
    is in no block, so it is left out when layers are given. ``where``: a predicate on LinearSpec. With no
    criterion: every linear that can be wrapped. The tied head is never selected (naming it is an error
    that says why); a selection that matches nothing is an error too.
    """
    specs = [s for s in linears(config).values() if not s.tied]
    picked = specs
    if names is not None:
        endings = [names] if isinstance(names, str) else list(names)
        for ending in endings:
            if not isinstance(ending, str) or not ending:
                raise InputError(f"linear names must be non-empty strings, got {ending!r}")
            if _matches(EMBEDDING, ending) and config.tie_word_embeddings:
                raise InputError(_tied_message(EMBEDDING))
            if not any(_matches(s.name, ending) for s in specs):
                raise InputError(
                    f"{ending!r} matches no linear of this model: name one of {', '.join(_kinds(config))}, "
                    "a block's (e.g. self_attn.q_proj) or a full name (model.layers.0.mlp.up_proj)"
                )
        picked = [s for s in picked if any(_matches(s.name, e) for e in endings)]
    if layers is not None:
        blocks = _blocks(config, layers)
        picked = [s for s in picked if s.layer in blocks]
    if where is not None:
        picked = [s for s in picked if where(s)]
    if not picked:
        raise InputError("the selection matches no linear: loosen it (names, layers, where)")
    return [s.name for s in picked]


def _kinds(config: Gemma3Config) -> list[str]:
    return [*_LINEAR_KINDS, *([] if config.tie_word_embeddings else [HEAD])]


def _blocks(config: Gemma3Config, layers: int | Iterable[int]) -> set[int]:
    count = config.num_hidden_layers
    items = [layers] if is_count(layers) else list(layers)  # type: ignore[arg-type]
    blocks = set()
    for item in items:
        if not is_count(item) or not -count <= item < count:
            raise InputError(f"layer {item!r} is not a block index in [0, {count}): this model has {count} blocks")
        blocks.add(int(item) % count)
    return blocks


def check_wrappable(config: Gemma3Config, names: Collection[str]) -> list[str]:
    """``names`` as a list, each the exact name of a linear that can be wrapped (what a walker's ``wrap``
    takes). Raises InputError for a name that is no linear (pointing at ``select``), for the tied head,
    and for a name given twice."""
    if isinstance(names, str):
        names = [names]
    known = linears(config)
    out: list[str] = []
    for name in names:
        spec = known.get(name) if isinstance(name, str) else None
        if spec is None:
            raise InputError(
                f"{name!r} is not a linear of this model: give full names such as "
                "model.layers.0.self_attn.q_proj, e.g. from gemmalab.linears.select(config, ['q_proj'])"
            )
        if spec.tied:
            raise InputError(_tied_message(name))
        if name in out:
            raise InputError(f"{name} is named twice: wrap each linear once")
        out.append(name)
    if not out:
        raise InputError("no linear to wrap: name at least one (gemmalab.linears.select helps)")
    return out


def checked_parameter_names(held: Collection[str], names: Collection[str]) -> list[str]:
    """``names`` as a list, each a parameter the model holds (``held``: a backend's parameter names); one
    InputError line naming the first that is not."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in held:
            raise InputError(f"the model holds no parameter {name!r}: Model.parameter_shapes() lists its names "
                             "(a wrapped linear's weight is <linear>.base.weight, its wrapper's <linear>.<param>)")
    return names


def base_weight(linear: str) -> str:
    """The backend parameter name of a wrapped linear's own dense weight: ``<linear>.base.weight``."""
    return f"{linear}.{BASE}.weight"


# --------------------------------------------------------------------------------------------------------
# Wrapper formulas (numpy): the specification each backend's wrappers compute
# --------------------------------------------------------------------------------------------------------
def check_kind(kind: str) -> str:
    if kind not in WRAPPER_KINDS:
        raise InputError(f"unknown wrapper {kind!r}: choose one of {', '.join(WRAPPER_KINDS)}")
    return kind


def output_scale(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """OutputScale ("output_scale"), a learned per-output-feature scale s [out] on a linear W [out, in]:
    ``y = s * (x @ W.T)``, which fuses into the dense weight ``s[:, None] * W``. A scale-only adapter:
    ``out`` parameters per linear, initialised to ones (the wrapped model computes what the base did)."""
    return np.asarray(scale)[:, None] * np.asarray(weight)


def output_scale_init(scale: object, out_features: int) -> np.ndarray:
    """The initial scale of an OutputScale as float32 [out_features]: ones when ``scale`` is None, else
    ``scale`` checked (a finite real vector of that length)."""
    if scale is None:
        return np.ones(out_features, np.float32)
    array = np.asarray(scale)
    if array.shape != (out_features,) or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InputError(f"an output scale must be a real vector of {out_features} values, got {array.dtype} {array.shape}")
    if not np.isfinite(array).all():
        raise InputError("an output scale must be finite")
    return array.astype(np.float32)


__all__ = [
    "BASE",
    "STACKING_KINDS",
    "EMBEDDING",
    "HEAD",
    "LinearSpec",
    "WRAPPER_KINDS",
    "base_weight",
    "check_kind",
    "check_wrappable",
    "checked_parameter_names",
    "linears",
    "output_scale",
    "output_scale_init",
    "select",
]
