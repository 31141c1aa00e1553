"""Knowledge distillation, teacher -> student: ``distill(DistillConfig(...))`` runs or resumes a run;
``gemmalab distill`` is its command line. The objective plugs into the training loop
(gemmalab.train.objective); the losses are gemmalab.train.losses' Distillation term."""

from .config import DistillConfig
from .generate import generate_data
from .run import DistillResult, distill

__all__ = ["DistillConfig", "DistillResult", "distill", "generate_data"]
