"""The walker over the model's linear layers, and the protocol of the wrappers that replace them.

The same names on every backend (gemmalab_torch.linears, gemmalab_jax.linears); which linears exist, how
they are selected and how wrapper parameters are named is decided in the core (gemmalab/linears.py):

* ``linears(model)``: name -> the module computing that linear now (an ``nn.Linear``, a ``Wrapper``, or
  for the tied head the ``nn.Embedding`` whose matrix it is), in checkpoint order;
* ``wrap(model, names, make_wrapper)``: each named linear replaced, where it sits (``self_attn.q_proj``),
  by ``make_wrapper(base)``, e.g. ``wrappers.OutputScale.from_base``;
* ``fuse(model)``: every wrapper replaced by a plain ``nn.Linear`` holding its ``fuse()``;
* ``dense_weights(model)``: the canonical dense arrays (what ``BACKEND.weights`` and ``save`` give);
* ``named_parameters(model)``: every parameter by its ``tree_flatten(model.parameters())`` name, wrappers'
  included: ``model.layers.0.self_attn.q_proj.scale`` beside the wrapped weight ``...q_proj.base.weight``.

The model file knows nothing of wrappers: it calls ``self.q_proj(x)``, whatever module that is.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from gemmalab.errors import BackendError, InputError
from gemmalab.linears import BASE, check_wrappable
from gemmalab.linears import linears as linear_specs
from gemmalab.params import parameter_shapes

from .model import DTYPES, Gemma3ForCausalLM


class Wrapper(nn.Module):
    """What replaces a linear layer: a module that computes a function of x [..., in_features] into
    [..., out_features] which a dense weight represents exactly (``fuse``).

    A subclass implements ``from_base`` (build it from the ``nn.Linear`` it replaces), ``__call__`` and
    ``fuse``, and the ``in_features`` / ``out_features`` properties. One that keeps the linear it wraps
    holds it as ``self.base`` (gemmalab.linears.BASE), so the dense weight is ``<linear>.base.weight``.
    """

    @classmethod
    def from_base(cls, base: nn.Linear, **options) -> Wrapper:
        raise NotImplementedError

    def fuse(self) -> mx.array:
        """The dense weight [out_features, in_features] this wrapper computes with, in the base's dtype
        (differentiable in its parameters)."""
        raise NotImplementedError

    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError


def _specs(model: Gemma3ForCausalLM):
    if not isinstance(model, Gemma3ForCausalLM):
        raise InputError(f"expected a gemmalab MLX model (Gemma3ForCausalLM), got {type(model).__name__}")
    return linear_specs(model.config)


def _get(model: nn.Module, name: str) -> nn.Module:
    node = model
    for part in name.split("."):
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(_get(model, parent) if parent else model, leaf, module)


def linears(model: Gemma3ForCausalLM) -> dict[str, nn.Module]:
    """Every linear by its HF name, in checkpoint order: the module computing it now."""
    return {name: _get(model, name) for name in _specs(model)}


def wrappers(model: Gemma3ForCausalLM) -> dict[str, Wrapper]:
    """The linears that are wrapped now, by name."""
    return {name: m for name, m in linears(model).items() if isinstance(m, Wrapper)}


def _is_stack(wrapper: Wrapper) -> bool:
    """Whether a wrapper wraps another wrapper (a LoRA over a quantized linear)."""
    return isinstance(getattr(wrapper, BASE, None), Wrapper)


def wrap(
    model: Gemma3ForCausalLM, names: Collection[str], make_wrapper: Callable[[nn.Linear], Wrapper],
    *, stack: bool = False,
) -> dict[str, Wrapper]:
    """Replace each named linear (exact names: gemmalab.linears.select makes them) by
    ``make_wrapper(base)``, in place; returns the new wrappers by name. Nothing changes when a name is
    unknown, the tied head or already wrapped: each is an InputError naming it. With ``stack`` a
    wrapped linear is wrapped again, its wrapper becoming the new one's base (LoRA over a quantized
    linear: gemmalab.linears.STACKING_KINDS), once: a stack is never stacked on."""
    names = check_wrappable(model.config, names)
    current = linears(model)
    for name in names:
        if isinstance(current[name], Wrapper) and not (stack and not _is_stack(current[name])):
            raise InputError(
                f"{name} is already wrapped ({type(current[name]).__name__}): fuse(model) first to wrap it again"
            )
    made = {}
    for name in names:
        base = current[name]
        new = make_wrapper(base)
        if not isinstance(new, Wrapper):
            raise InputError(
                f"make_wrapper gave a {type(new).__name__} for {name}: it must return a "
                "gemmalab_mlx.linears.Wrapper (e.g. wrappers.OutputScale.from_base)"
            )
        spec = linear_specs(model.config)[name]  # not the base's arrays: a quantized base packs its weight
        in_features, out_features = spec.in_features, spec.out_features
        if (new.in_features, new.out_features) != (in_features, out_features):
            raise InputError(
                f"{type(new).__name__} for {name} maps {new.in_features} -> {new.out_features} features, "
                f"but the linear maps {in_features} -> {out_features}"
            )
        made[name] = new
    for name, new in made.items():
        _put(model, name, new)
    return made


def _fused(model: Gemma3ForCausalLM, name: str, wrapped: Wrapper) -> mx.array:
    weight = mx.stop_gradient(wrapped.fuse())
    expected = tuple(parameter_shapes(model.config)[name + ".weight"])
    if tuple(weight.shape) != expected or weight.dtype != DTYPES[model.dtype]:
        raise BackendError(
            f"{type(wrapped).__name__}.fuse() for {name} gave {weight.dtype} {tuple(weight.shape)}, "
            f"not the model's {model.dtype} {expected}: the wrapper is broken"
        )
    return weight


def fuse(model: Gemma3ForCausalLM) -> list[str]:
    """Replace every wrapper by a plain ``nn.Linear`` holding its ``fuse()``, evaluated now (on a
    shape-only model it stays lazy, never evaluated); returns the names fused."""
    done = []
    with mx.stream(model.device or mx.default_device()):
        for name, wrapped in wrappers(model).items():
            weight = _fused(model, name, wrapped)
            if not model.shape_only:
                mx.eval(weight)
            dense = nn.Linear(wrapped.in_features, wrapped.out_features, bias=False)
            dense.weight = weight  # replaces the lazy random initial value, which is never evaluated
            _put(model, name, dense)
            done.append(name)
    return done


def dense_weights(model: Gemma3ForCausalLM) -> dict[str, mx.array]:
    """Every canonical parameter (gemmalab.params.parameter_shapes) as an array, in checkpoint order: the
    model's own where it is plain, a wrapper's ``fuse()`` under its linear's weight name."""
    wrapped = wrappers(model)
    params = named_parameters(model)
    out = {}
    with mx.stream(model.device or mx.default_device()):
        for name in parameter_shapes(model.config):
            linear = name.removesuffix(".weight")
            out[name] = _fused(model, linear, wrapped[linear]) if linear in wrapped else params[name]
    return out


def named_parameters(model: Gemma3ForCausalLM) -> dict[str, mx.array]:
    """Every parameter the model holds by its ``tree_flatten(model.parameters())`` name (the tied matrix
    once): canonical names, except that a wrapped linear's weight is ``<linear>.base.weight`` and its
    wrapper's own parameters are ``<linear>.<param>``."""
    return dict(tree_flatten(model.parameters()))


__all__ = ["Wrapper", "dense_weights", "fuse", "linears", "named_parameters", "wrap", "wrappers"]
