"""gemmalab's MLX backend: the Gemma 3 model in MLX (``model``) behind the core's Backend protocol.

The core finds it by name (``gemmalab.backend.get_backend("mlx")``) and uses ``BACKEND``. MLX runs on the
Apple-Silicon GPU through Metal; the Linux build of MLX runs on CPU, for correctness rather than speed.
"""

from .backend import MLXBackend

BACKEND = MLXBackend()

__all__ = ["BACKEND", "MLXBackend"]
