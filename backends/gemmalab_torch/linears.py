"""The walker over the model's linear layers, and the protocol of the wrappers that replace them.

The same names on every backend (gemmalab_mlx.linears, gemmalab_jax.linears); which linears exist, how
they are selected and how wrapper parameters are named is decided in the core (gemmalab/linears.py):

* ``linears(model)``: name -> the module computing that linear now (an ``nn.Linear``, a ``Wrapper``, or
  for the tied head the ``nn.Embedding`` whose matrix it is), in checkpoint order;
* ``wrap(model, names, make_wrapper)``: each named linear replaced, where it sits (``self_attn.q_proj``),
  by ``make_wrapper(base)``, e.g. ``wrappers.OutputScale.from_base``;
* ``fuse(model)``: every wrapper replaced by a plain ``nn.Linear`` holding its ``fuse()``;
* ``dense_weights(model)``: the canonical dense tensors (what ``BACKEND.weights`` and ``save`` give);
* ``named_parameters(model)``: every parameter by its ``named_parameters`` name, wrappers' included:
  ``model.layers.0.self_attn.q_proj.scale`` beside the wrapped weight ``...q_proj.base.weight``.

The model file knows nothing of wrappers: it calls ``self.q_proj(x)``, whatever module that is.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import Tensor, nn

from gemmalab.errors import BackendError, InputError
from gemmalab.linears import BASE, check_wrappable
from gemmalab.linears import linears as linear_specs
from gemmalab.params import parameter_shapes

from .model import Gemma3ForCausalLM


class Wrapper(nn.Module):
    """What replaces a linear layer: a module that computes a function of x [..., in_features] into
    [..., out_features] which a dense weight represents exactly (``fuse``).

    A subclass implements ``from_base`` (build it from the ``nn.Linear`` it replaces), ``forward`` and
    ``fuse``, and sets ``in_features`` and ``out_features``. One that keeps the linear it wraps holds it as
    ``self.base`` (gemmalab.linears.BASE), so the dense weight is the parameter ``<linear>.base.weight``.
    Its parameters follow the base weight's ``requires_grad``: a model built for inference stays without
    gradients, and the trainer turns them on by name.
    """

    in_features: int
    out_features: int

    @classmethod
    def from_base(cls, base: nn.Linear, **options) -> Wrapper:
        raise NotImplementedError

    def fuse(self) -> Tensor:
        """The dense weight [out_features, in_features] this wrapper computes with, in the base's dtype;
        differentiable (the walker calls it under no_grad to fuse)."""
        raise NotImplementedError


def _specs(model: Gemma3ForCausalLM):
    if not isinstance(model, Gemma3ForCausalLM):
        raise InputError(f"expected a gemmalab torch model (Gemma3ForCausalLM), got {type(model).__name__}")
    return linear_specs(model.config)


def linears(model: Gemma3ForCausalLM) -> dict[str, nn.Module]:
    """Every linear by its HF name, in checkpoint order: the module computing it now."""
    return {name: model.get_submodule(name) for name in _specs(model)}


def wrappers(model: Gemma3ForCausalLM) -> dict[str, Wrapper]:
    """The linears that are wrapped now, by name."""
    return {name: m for name, m in linears(model).items() if isinstance(m, Wrapper)}


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


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
        wrapper = make_wrapper(base)
        if not isinstance(wrapper, Wrapper):
            raise InputError(
                f"make_wrapper gave a {type(wrapper).__name__} for {name}: it must return a "
                "gemmalab_torch.linears.Wrapper (e.g. wrappers.OutputScale.from_base)"
            )
        if (wrapper.in_features, wrapper.out_features) != (base.in_features, base.out_features):
            raise InputError(
                f"{type(wrapper).__name__} for {name} maps {wrapper.in_features} -> {wrapper.out_features} "
                f"features, but the linear maps {base.in_features} -> {base.out_features}"
            )
        made[name] = wrapper
    for name, wrapper in made.items():
        _put(model, name, wrapper)
    return made


def _fused(name: str, wrapper: Wrapper, dtype: torch.dtype) -> Tensor:
    with torch.no_grad():
        weight = wrapper.fuse().detach()
    expected = (wrapper.out_features, wrapper.in_features)
    if tuple(weight.shape) != expected or weight.dtype != dtype:
        raise BackendError(
            f"{type(wrapper).__name__}.fuse() for {name} gave {weight.dtype} {tuple(weight.shape)}, "
            f"not the model's {dtype} {expected}: the wrapper is broken"
        )
    return weight


def fuse(model: Gemma3ForCausalLM) -> list[str]:
    """Replace every wrapper by a plain ``nn.Linear`` holding its ``fuse()`` (a fresh parameter without
    gradient, as ``build`` makes them); returns the names fused."""
    done = []
    for name, wrapper in wrappers(model).items():
        weight = _fused(name, wrapper, model.dtype)
        dense = nn.Linear(wrapper.in_features, wrapper.out_features, bias=False, device="meta")
        dense.weight = nn.Parameter(weight, requires_grad=False)
        _put(model, name, dense)
        done.append(name)
    return done


def dense_weights(model: Gemma3ForCausalLM) -> dict[str, Tensor]:
    """Every canonical parameter (gemmalab.params.parameter_shapes) as a tensor, in checkpoint order: the
    model's own where it is plain, a wrapper's ``fuse()`` under its linear's weight name."""
    wrapped = wrappers(model)
    out = {}
    for name in parameter_shapes(model.config):
        linear = name.removesuffix(".weight")
        out[name] = _fused(linear, wrapped[linear], model.dtype) if linear in wrapped else model.get_parameter(name)
    return out


def named_parameters(model: Gemma3ForCausalLM) -> dict[str, nn.Parameter]:
    """Every parameter the model holds by its ``named_parameters`` name (the tied matrix once): canonical
    names, except that a wrapped linear's weight is ``<linear>.base.weight`` and its wrapper's own
    parameters are ``<linear>.<param>``."""
    return dict(model.named_parameters())


__all__ = ["Wrapper", "dense_weights", "fuse", "linears", "named_parameters", "wrap", "wrappers"]
