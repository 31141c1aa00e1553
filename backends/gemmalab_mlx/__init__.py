"""gemmalab's MLX backend: the Gemma 3 model in MLX (``model``) behind the core's Backend protocol.

``BACKEND`` implements gemmalab.backend.Backend; ``BACKEND.build(...)`` returns the native module,
``model.Gemma3ForCausalLM``, whose parameter names are the canonical (Hugging Face) names.

The core finds it by name (``gemmalab.backend.get_backend("mlx")``) and uses ``BACKEND``. MLX runs on the
Apple-Silicon GPU through Metal; the Linux build of MLX runs on CPU, for correctness rather than speed.
"""

from .backend import MLXBackend
from .cache import KVCache
from .model import Gemma3ForCausalLM, Gemma3Output

BACKEND = MLXBackend()

__all__ = ["BACKEND", "Gemma3ForCausalLM", "Gemma3Output", "KVCache", "MLXBackend"]
