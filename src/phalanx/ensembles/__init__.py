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
from phalanx.ensembles.ensemble import (
    Combiner,
    Ensemble,
    combine,
    draw_probabilities,
    expected_correct,
    soft_vote,
    vote_can_tie,
    vote_scores,
)

__all__ = ["Combiner", "Ensemble", "ModelConfig", "atomic_save", "build_ensemble", "check_dataset", "check_finite",
           "checkpoint_info", "combine", "draw_probabilities", "ensemble_from_state", "ensemble_state",
           "expected_correct", "load_ensemble", "safe_load", "save_ensemble", "soft_vote", "vote_can_tie", "vote_scores"]
