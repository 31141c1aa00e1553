"""gemmalab's JAX backend (TPU, GPU, CPU), optionally sharded over a ("data", "model") device mesh.

``BACKEND`` implements gemmalab.backend.Backend; ``BACKEND.build(...)`` returns a ``JaxModel`` holding the
parameter tree, whose flattened names are the canonical (Hugging Face) names, and the jitted functions that
run it. ``gemmalab.load(..., backend="jax", mesh={"data": 2, "model": 4})`` shards it (sharding.py).
Importing this package imports jax; importing gemmalab's core never does.
"""

from .backend import JaxBackend, JaxModel
from .cache import KVCache
from .model import Gemma3Output
from .sharding import Plan

BACKEND = JaxBackend()

__all__ = ["BACKEND", "Gemma3Output", "JaxBackend", "JaxModel", "KVCache", "Plan"]
