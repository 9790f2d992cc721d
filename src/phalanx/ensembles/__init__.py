"""Ensembles of classifiers and their checkpoint format."""

from phalanx.ensembles.build import ModelConfig, build_ensemble
from phalanx.ensembles.checkpoint import (
    atomic_save,
    check_dataset,
    check_finite,
    checkpoint_info,
    ensemble_from_state,
    ensemble_state,
    load_ensemble,
    safe_load,
    save_ensemble,
)
from phalanx.ensembles.ensemble import Combiner, Ensemble, combine

__all__ = ["Combiner", "Ensemble", "ModelConfig", "atomic_save", "build_ensemble", "check_dataset", "check_finite",
           "checkpoint_info", "combine",
           "ensemble_from_state",
           "ensemble_state", "load_ensemble", "safe_load", "save_ensemble"]
