"""gemmalab's training engine: the control logic (this package, numpy only) over a backend's tensor work.

``train(TrainConfig(...))`` runs or resumes a run; ``gemmalab train`` is its command line.
"""

from .config import TrainConfig
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
