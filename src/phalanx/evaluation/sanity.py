"""Sanity checks reported with every evaluation: signs of gradient masking (Athalye et al.
2018; Carlini et al. 2019, "On evaluating adversarial robustness"). A failed check is logged as
a warning and reported, never silently dropped."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from phalanx.attacks import GradientAttack, fgsm
from phalanx.data import Split
from phalanx.types import Norm, ThreatModel

log = logging.getLogger(__name__)

#: accuracy may rise by at most this much (1 point) with more steps before we warn
TOLERANCE = 0.01


@dataclass(frozen=True)
class SanityCheck:
    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail,
                "advice": "" if self.passed else ADVICE.get(self.name, "possible gradient masking")}


#: what a failed check suggests
ADVICE = {"convergence": "the attack has not converged; use more steps or restarts",
          "single-step >= multi-step": "possible gradient masking",
          "black-box >= white-box": "possible gradient masking: a transfer attack beat the worst case of the "
                                    "white-box attacks and a 50-step PGD (or a surrogate equals the target)",
          "monotone in eps": "accuracy rose with eps: the attack is not converging or gradients are masked",
          "far below": "the weaker attack overestimates robustness (gradient masking of the combined output); "
                       "report the stronger one"}


def _warn(check: SanityCheck) -> SanityCheck:
    if not check.passed:
        log.warning("sanity check failed (%s): %s: %s", ADVICE.get(check.name, "possible gradient masking"),
                    check.name, check.detail)
    return check


def check_convergence(acc_few: float, acc_many: float, steps_few: int, steps_many: int, eps: float) -> SanityCheck:
    """The attack has converged: more steps do not lower accuracy by more than 1 point."""
    ok = acc_few - acc_many <= TOLERANCE
    return _warn(SanityCheck("convergence", ok,
                             f"eps {eps:g}: {steps_few} steps {100 * acc_few:.1f}%, {steps_many} steps "
                             f"{100 * acc_many:.1f}% (allowed difference 1 point)"))


def check_single_vs_multi(acc_single: float, acc_multi: float, eps: float) -> SanityCheck:
    """A single-step attack must not beat the iterative one."""
    ok = acc_single + TOLERANCE >= acc_multi
    return _warn(SanityCheck("single-step >= multi-step", ok,
                             f"eps {eps:g}: single-step {100 * acc_single:.1f}%, multi-step {100 * acc_multi:.1f}%"))


def check_blackbox_vs_whitebox(acc_black: float, acc_white: float, eps: float) -> SanityCheck:
    """A transfer (black-box) attack must not beat the white-box one."""
    ok = acc_black + TOLERANCE >= acc_white
    return _warn(SanityCheck("black-box >= white-box", ok,
                             f"eps {eps:g}: black-box {100 * acc_black:.1f}%, white-box {100 * acc_white:.1f}%"))


def check_monotone(name: str, curve: list[tuple[float, float]]) -> SanityCheck:
    """Accuracy must not rise with eps (by more than 1 point) along ``curve`` [(eps, acc)]."""
    pts = sorted(curve)
    rises = [(a, b) for a, b in pairwise(pts) if b[1] > a[1] + TOLERANCE]
    detail = "; ".join(f"eps {a[0]:g} {100 * a[1]:.1f}% -> eps {b[0]:g} {100 * b[1]:.1f}%" for a, b in rises)
    return _warn(SanityCheck("monotone in eps", not rises, f"{name}: " + (detail or "non-increasing")))


def check_far_below(strong: str, acc_strong: float, weak: str, acc_weak: float, eps: float,
                    gap: float = 0.05) -> SanityCheck:
    """``strong`` must not be more than ``gap`` below ``weak`` (e.g. MORA or transfer far below PGD
    on the averaged output: that PGD's number is not a robustness claim)."""
    ok = acc_weak - acc_strong <= gap + 1e-9  # accuracies are fractions k/n: 0.55 - 0.50 must not exceed 0.05
    return _warn(SanityCheck("far below", ok, f"eps {eps:g}: {strong} {100 * acc_strong:.1f}% vs {weak} "
                                              f"{100 * acc_weak:.1f}% (allowed gap {100 * gap:.0f} points)"))


def gradient_sanity_checks(model: nn.Module, split: Split, eps: float, attack: GradientAttack, *,
                           factor: int = 4, batch_size: int = 500, generator: torch.Generator | None = None,
                           norm: Norm = Norm.LINF) -> list[SanityCheck]:
    """Run FGSM, ``attack`` and ``attack`` with ``factor`` times the steps (same total path
    length per step) at one ``eps``; return the convergence and single-vs-multi-step checks."""
    from phalanx.evaluation.robustness import robust_correct

    threat = ThreatModel(norm, eps)
    # DVERGE --convergence-check: PGD keeps its step (eps/5) with 10x/20x the steps; attacks
    # whose step is eps/steps (BIM, MIM) keep their total path length
    many = attack.with_(steps=attack.steps * factor,
                        step_size=attack.step_size if attack.random_start else attack.step_size / factor)
    acc = {}
    for key, atk in (("single", fgsm(loss=attack.loss if attack.loss in ("ce", "cw") else "ce")),
                     ("few", attack), ("many", many)):
        ok = robust_correct(model, split, atk, threat, batch_size=batch_size, generator=generator)
        acc[key] = float(ok.float().mean()) if len(ok) else 0.0
    return [check_convergence(acc["few"], acc["many"], attack.steps, many.steps, eps),
            check_single_vs_multi(acc["single"], min(acc["few"], acc["many"]), eps)]


__all__ = ["TOLERANCE", "SanityCheck", "check_blackbox_vs_whitebox", "check_convergence", "check_far_below",
           "check_monotone", "check_single_vs_multi",
           "gradient_sanity_checks"]
