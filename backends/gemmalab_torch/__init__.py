"""gemmalab's PyTorch backend (CUDA, MPS, CPU).

``BACKEND`` implements gemmalab.backend.Backend; ``BACKEND.build(...)`` returns the native module,
``model.Gemma3ForCausalLM``, whose parameter names are the canonical (Hugging Face) names. Importing this
package imports torch; importing gemmalab's core never does.
"""

from .backend import TorchBackend
from .cache import KVCache
from .model import Gemma3ForCausalLM, Gemma3Output

BACKEND = TorchBackend()

__all__ = ["BACKEND", "Gemma3ForCausalLM", "Gemma3Output", "KVCache", "TorchBackend"]
