"""The walker over the model's linear layers, and the protocol of the wrappers that replace them.

The same names on every backend (gemmalab_torch.linears, gemmalab_mlx.linears); which linears exist, how
they are selected and how wrapper parameters are named is decided in the core (gemmalab/linears.py):

* ``linears(model)``: name -> the leaf of the parameter tree computing that linear now (a plain
  ``{"weight": W}`` or a ``Wrapper``; for the tied head, the embedding's leaf), in checkpoint order;
* ``wrap(model, names, make_wrapper)``: each named leaf replaced by ``make_wrapper(base)``, e.g.
  ``wrappers.OutputScale.from_base``, where ``base`` is the plain leaf ``{"weight": W}``;
* ``fuse(model)``: every wrapper replaced by a plain leaf holding its ``fuse()``;
* ``dense_weights(model)``: the canonical dense arrays (what ``BACKEND.weights`` and ``save`` give);
* ``named_parameters(model)``: every array of the tree by name, wrappers' included:
  ``model.layers.0.self_attn.q_proj.scale`` beside the wrapped weight ``...q_proj.base.weight``
  (``model.flatten``; ``model.rebuild`` puts such a flat mapping back into a tree with its wrappers).

A wrapper is a frozen dataclass registered as a pytree node (``@wrapper``): its array fields are children,
so jit traces them, ``jax.grad`` over the tree differentiates them and ``flatten`` names them; fields marked
``static_field()`` are static (hashable: they key jit's cache). ``model.linear(p, x)`` calls it on x.
The tree is rebuilt on every change (``model.params`` is replaced, never edited in place).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, TypeVar

import jax

from gemmalab.errors import BackendError, InputError
from gemmalab.linears import BASE, check_wrappable
from gemmalab.linears import linears as linear_specs
from gemmalab.params import parameter_shapes

from .model import Params, flatten

if TYPE_CHECKING:  # backend.py imports this module
    from .backend import JaxModel

W = TypeVar("W", bound=type)


class Wrapper:
    """What replaces a linear leaf: a pytree node (decorate subclasses with ``@wrapper``) computing a
    function of x [..., in_features] into [..., out_features] that a dense weight represents exactly.

    A subclass implements ``from_base`` (build it from the plain leaf ``{"weight": W}`` it replaces; W may
    be a jax.ShapeDtypeStruct on a shape-only model, which the walker handles by tracing ``from_base`` with
    ``jax.eval_shape``), ``__call__(x)``, ``fuse()`` and the ``in_features`` / ``out_features`` properties.
    One that keeps the leaf it wraps holds it as the field ``base`` (gemmalab.linears.BASE), so the dense
    weight is named ``<linear>.base.weight``.
    """

    @classmethod
    def from_base(cls, base: dict[str, jax.Array], **options: Any) -> Wrapper:
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def fuse(self) -> jax.Array:
        """The dense weight [out_features, in_features] this wrapper computes with, in the base's dtype
        (a pure function of its arrays: differentiable)."""
        raise NotImplementedError

    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError


def wrapper(cls: W) -> W:
    """Class decorator of a Wrapper subclass: a frozen dataclass registered as a pytree node, its fields
    children unless declared with ``static_field()``."""
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


def static_field(**kwargs: Any) -> Any:
    """A wrapper field that is static (not an array): part of the jit cache key, so hashable."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


def _path(name: str) -> list[str | int]:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def _get(params: Params, name: str) -> Any:
    node = params
    for part in _path(name):
        node = node[part]
    return node


def _replaced(params: Params, name: str, leaf: Any) -> Params:
    """A copy of the tree with the subtree at ``name`` replaced (the containers on the way copied, every
    other subtree shared)."""

    def put(node: Any, path: list[str | int]) -> Any:
        if not path:
            return leaf
        copy = list(node) if isinstance(node, list) else dict(node)
        copy[path[0]] = put(node[path[0]], path[1:])
        return copy

    return put(params, _path(name))


def _specs(model: JaxModel):
    if not (hasattr(model, "params") and hasattr(model, "plan")):
        raise InputError(f"expected a gemmalab JaxModel, got {type(model).__name__}")
    return linear_specs(model.config)


def linears(model: JaxModel) -> dict[str, Any]:
    """Every linear by its HF name, in checkpoint order: the leaf computing it now."""
    return {name: _get(model.params, name) for name in _specs(model)}


def wrappers(model: JaxModel) -> dict[str, Wrapper]:
    """The linears that are wrapped now, by name."""
    return {name: leaf for name, leaf in linears(model).items() if isinstance(leaf, Wrapper)}


def _placed(model: JaxModel, new: Wrapper, base: Any) -> Wrapper:
    """The wrapper with its arrays on the model's devices: arrays it took from the base stay as they are
    (sharded by the plan); new ones not already spread over the mesh are replicated over it."""
    if model.shape_only:
        return new
    kept = {id(leaf) for leaf in jax.tree_util.tree_leaves(base)}
    devices = set(model.mesh.devices.flat)
    replicated = model.plan.replicated()

    def place(leaf: Any) -> Any:
        if id(leaf) in kept or (isinstance(leaf, jax.Array) and leaf.sharding.device_set == devices):
            return leaf
        return jax.device_put(leaf, replicated)

    return jax.tree.map(place, new)


def _is_stack(wrapper: Wrapper) -> bool:
    """Whether a wrapper wraps another wrapper (a LoRA over a quantized linear)."""
    return isinstance(getattr(wrapper, BASE, None), Wrapper)


def wrap(
    model: JaxModel, names: Collection[str], make_wrapper: Callable[[dict[str, jax.Array]], Wrapper],
    *, stack: bool = False,
) -> dict[str, Wrapper]:
    """Replace each named linear (exact names: gemmalab.linears.select makes them) by
    ``make_wrapper(base)``, in ``model.params`` (a new tree); returns the new wrappers by name. Nothing
    changes when a name is unknown, the tied head or already wrapped: each is an InputError naming it. With ``stack`` a
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
        # Shape-only: trace the constructor on the shapes, so nothing is allocated.
        new = jax.eval_shape(make_wrapper, base) if model.shape_only else make_wrapper(base)
        if not isinstance(new, Wrapper):
            raise InputError(
                f"make_wrapper gave a {type(new).__name__} for {name}: it must return a "
                "gemmalab_jax.linears.Wrapper (e.g. wrappers.OutputScale.from_base)"
            )
        spec = linear_specs(model.config)[name]  # not the base's arrays: a quantized base packs its weight
        if (new.in_features, new.out_features) != (spec.in_features, spec.out_features):
            raise InputError(
                f"{type(new).__name__} for {name} maps {new.in_features} -> {new.out_features} features, "
                f"but the linear maps {spec.in_features} -> {spec.out_features}"
            )
        made[name] = _placed(model, new, base)
    params = model.params
    for name, new in made.items():
        params = _replaced(params, name, new)
    model.params = params
    return made


def _fused(model: JaxModel, name: str, wrapped: Wrapper) -> Any:
    with model._precision():  # float32 models fuse in full fp32 (a TPU would round matmul inputs to bf16)
        weight = jax.eval_shape(lambda w: w.fuse(), wrapped) if model.shape_only else wrapped.fuse()
    expected = parameter_shapes(model.config)[name + ".weight"]
    if tuple(weight.shape) != expected or weight.dtype != jax.numpy.dtype(model.dtype):
        raise BackendError(
            f"{type(wrapped).__name__}.fuse() for {name} gave {weight.dtype} {tuple(weight.shape)}, "
            f"not the model's {model.dtype} {expected}: the wrapper is broken"
        )
    return weight


def fuse(model: JaxModel) -> list[str]:
    """Replace every wrapper by a plain leaf ``{"weight": fuse()}``, placed as the plan places that
    weight; returns the names fused."""
    params, done = model.params, []
    for name, wrapped in wrappers(model).items():
        weight = _fused(model, name, wrapped)
        sharding = model.plan.parameter_sharding(name + ".weight")
        if model.shape_only:
            weight = jax.ShapeDtypeStruct(weight.shape, weight.dtype, sharding=sharding)
        else:
            weight = jax.device_put(weight, sharding)
        params = _replaced(params, name, {"weight": weight})
        done.append(name)
    model.params = params
    return done


def dense_weights(model: JaxModel) -> dict[str, jax.Array]:
    """Every canonical parameter (gemmalab.params.parameter_shapes) as an array, in checkpoint order: the
    tree's own where it is plain, a wrapper's ``fuse()`` under its linear's weight name."""
    wrapped = wrappers(model)
    flat = flatten(model.params)
    out = {}
    for name in parameter_shapes(model.config):
        linear = name.removesuffix(".weight")
        out[name] = _fused(model, linear, wrapped[linear]) if linear in wrapped else flat[name]
    return out


def named_parameters(model: JaxModel) -> dict[str, jax.Array]:
    """Every array of the parameter tree by name (``model.flatten``; the tied matrix once): canonical
    names, except that a wrapped linear's weight is ``<linear>.base.weight`` and its wrapper's own arrays
    are ``<linear>.<field>``."""
    return flatten(model.params)


__all__ = [
    "Wrapper",
    "dense_weights",
    "fuse",
    "linears",
    "named_parameters",
    "static_field",
    "wrap",
    "wrapper",
    "wrappers",
]
