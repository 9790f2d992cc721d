"""Training: one loop (``fit``) and pluggable training methods (baseline, ADP, GAL, TRS, DVERGE,
DVERGE+AdvT, SMD, SMD+, AdvT, EAT, iGAT)."""

from phalanx.training import baseline as _baseline  # noqa: F401  (registers the method)
from phalanx.training.adp import ADP
from phalanx.training.adversarial import AdversarialTraining, EnsembleAdversarialTraining
from phalanx.training.base import (
    METHODS,
    Batch,
    LossOutput,
    StepContext,
    TrainingMethod,
    create_method,
)
from phalanx.training.baseline import Baseline, member_cross_entropy
from phalanx.training.dverge import DVERGE
from phalanx.training.gal import GAL
from phalanx.training.igat import IGAT
from phalanx.training.loop import (
    FitResult,
    TrainConfig,
    epoch_generator,
    evaluate_clean,
    fit,
    resolve_device,
)
from phalanx.training.smd import SMD
from phalanx.training.trs import TRS

__all__ = ["ADP", "DVERGE", "GAL", "IGAT", "METHODS", "SMD", "TRS", "AdversarialTraining", "Baseline", "Batch",
           "EnsembleAdversarialTraining", "FitResult", "LossOutput", "StepContext", "TrainConfig",
           "TrainingMethod", "create_method", "epoch_generator", "evaluate_clean", "fit",
           "member_cross_entropy", "resolve_device"]
