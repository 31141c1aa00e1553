"""Where arrays live: a ``Plan`` maps parameters, activations, token batches and KV caches onto a device mesh.

The mesh has two axes, ``"data"`` (D devices) and ``"model"`` (M devices); ``build(..., mesh={"data": D,
"model": M})`` takes the first D * M devices of the platform. One device is the 1 x 1 mesh, so a single
device and a slice run the same code.

Parameters are sharded FSDP-style over "data" and tensor-parallel over "model" (weights are HF-shaped,
[out_features, in_features]):

    parameter                      dim 0                dim 1
    embed_tokens, lm_head          vocab    -> model    hidden -> data
    q_proj                         heads    -> model    hidden -> data
    k_proj, v_proj                 kv heads -> model    hidden -> data
    o_proj                         hidden   -> data     heads  -> model
    gate_proj, up_proj             mlp      -> model    hidden -> data
    down_proj                      hidden   -> data     mlp    -> model
    norms (every *norm.weight)     replicated (a few kB)

so each device holds about 1 / (D * M) of the parameters. Activations and token batches are split over
"data" by batch row; attention heads, MLP columns and logits' vocab columns over "model". KV caches are
[batch, slots, kv_heads, head_dim]: batch over "data", kv heads over "model". XLA (GSPMD) inserts the
collectives: all-gathers of the FSDP-sharded weights, reductions after o_proj and down_proj.

When a count does not divide its mesh axis, that dimension is replicated over the axis instead of split,
and the model still computes the same numbers: a head count that does not divide M (e.g. the 1B's single
kv head on M = 4: k_proj, v_proj and the cache's head axis are then whole on every "model" device, which
costs memory on those small projections but no extra communication), a vocabulary, hidden size or MLP
width that does not divide, or a batch that does not divide D (then every "data" group computes every row;
make the batch a multiple of D to use them). Heads are never split inside a head. The model keeps the list
of such fallbacks as ``plan.fallbacks`` (empty when everything divides), and build warns once with it. A
mesh larger than the devices present is an error naming the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gemmalab.checks import is_count
from gemmalab.config import Gemma3Config
from gemmalab.errors import BackendError

AXES = ("data", "model")
# Logical roles -> mesh axis. "embed" is the hidden dim of a *parameter* (FSDP); activations keep their
# hidden dim whole and split by "batch" instead.
RULES = {
    "batch": "data",
    "embed": "data",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": "model",
}


def make_mesh(spec: Mapping[str, int] | Mesh | None, devices: list[Any]) -> Mesh:
    """A ("data", "model") mesh from {"data": D, "model": M} (missing axes are 1) over the first D * M of
    ``devices``, or a given jax Mesh with those axis names. None = a 1 x 1 mesh over devices[0]."""
    if isinstance(spec, Mesh):
        if set(spec.axis_names) != set(AXES):
            raise BackendError(
                f"a jax Mesh for gemmalab needs the axes {AXES}, got {spec.axis_names}: "
                f"pass mesh={{'data': D, 'model': M}} instead"
            )
        return spec
    sizes = {"data": 1, "model": 1}
    if spec is not None:
        if not isinstance(spec, Mapping) or set(spec) - set(AXES):
            raise BackendError(f"mesh must be a mapping like {{'data': 2, 'model': 4}}, got {spec!r}")
        for axis, size in spec.items():
            if not is_count(size) or size < 1:
                raise BackendError(f"mesh axis {axis!r} must be a positive integer, got {size!r}")
            sizes[axis] = int(size)
    needed = sizes["data"] * sizes["model"]
    if needed > len(devices):
        platform = devices[0].platform
        hint = (
            f"on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={needed} before jax is imported"
            if platform == "cpu"
            else "choose a smaller mesh"
        )
        raise BackendError(
            f"mesh {sizes} needs {needed} devices but {len(devices)} {platform} device(s) are present: {hint}"
        )
    grid = np.array(devices[:needed], dtype=object).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, AXES)


@dataclass(eq=False)
class Plan:
    """Sharding rules of one model on one mesh (see the module docstring). Hashable by (mesh, config): a
    static argument of the jitted functions."""

    mesh: Mesh
    config: Gemma3Config
    fallbacks: list[str] = field(default_factory=list)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and (self.mesh, self.config) == (other.mesh, other.config)

    def __hash__(self) -> int:
        return hash((self.mesh, self.config))

    @property
    def size(self) -> int:
        return self.mesh.devices.size

    def _axis(self, role: str | None, count: int, what: str | None = None) -> str | None:
        """The mesh axis for a dim of ``count`` units in ``role``, or None (replicated) when it does not
        divide; a parameter's fallback is recorded under ``what``."""
        axis = RULES.get(role) if role else None
        if axis is None or self.mesh.shape[axis] == 1:
            return None
        if count % self.mesh.shape[axis]:
            size = self.mesh.shape[axis]
            note = f"{what}: {count} {role} do not divide {axis}={size}, replicated over {axis!r}"
            if what is not None and note not in self.fallbacks:
                self.fallbacks.append(note)
            return None
        return axis

    # -- parameters ----------------------------------------------------------------------------------------
    def parameter_spec(self, name: str) -> P:
        c = self.config
        h, m, v = c.hidden_size, c.intermediate_size, c.vocab_size
        q, kv = c.num_attention_heads, c.num_key_value_heads
        kind = name.split(".")[-2]  # q_proj, embed_tokens, input_layernorm, ...
        roles = {
            "embed_tokens": (("vocab", v), ("embed", h)),
            "lm_head": (("vocab", v), ("embed", h)),
            "q_proj": (("heads", q), ("embed", h)),
            "k_proj": (("kv_heads", kv), ("embed", h)),
            "v_proj": (("kv_heads", kv), ("embed", h)),
            "o_proj": (("embed", h), ("heads", q)),
            "gate_proj": (("mlp", m), ("embed", h)),
            "up_proj": (("mlp", m), ("embed", h)),
            "down_proj": (("embed", h), ("mlp", m)),
        }.get(kind)
        if roles is None:  # the norms
            return P()
        # Record a fallback once per kind of parameter, not once per layer.
        what = kind if ".layers." not in name or ".layers.0." in name else None
        return P(*(self._axis(role, count, what) for role, count in roles))

    def parameter_sharding(self, name: str) -> NamedSharding:
        return NamedSharding(self.mesh, self.parameter_spec(name))

    # -- activations, inputs, caches -------------------------------------------------------------------------
    def spec(self, shape: tuple[int, ...], roles: tuple[str | None, ...]) -> P:
        """The spec of an activation of ``shape`` whose dims play ``roles`` (None = whole)."""
        return P(*(self._axis(role, size) for role, size in zip(roles, shape, strict=True)))

    def hint(self, x: jax.Array, roles: tuple[str | None, ...]) -> jax.Array:
        """model.Hint: constrain an activation's layout inside a jitted function (no-op on one device)."""
        if self.size == 1:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(x.shape, roles)))

    def batch_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        """Token ids, RoPE tables, pad lengths: split by batch row (dim 0) over "data"."""
        return NamedSharding(self.mesh, self.spec(shape, ("batch",) + (None,) * (len(shape) - 1)))

    def cache_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        """A KV buffer [batch, slots, kv_heads, head_dim]."""
        return NamedSharding(self.mesh, self.spec(shape, ("batch", None, "kv_heads", None)))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def describe(self) -> str:
        shape = ", ".join(f"{axis}={size}" for axis, size in self.mesh.shape.items())
        return f"mesh({shape}) on {self.mesh.devices.flat[0].platform}"


def bytes_per_device(params: Any) -> dict[Any, int]:
    """Parameter bytes held by each device (for checking that sharding splits them)."""
    out: dict[Any, int] = {}
    for leaf in jax.tree_util.tree_leaves(params):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + math.prod(shard.data.shape) * leaf.dtype.itemsize
    return out
