"""White-box protocol: accuracy-vs-eps curves of a whole ensemble under a list of attacks, the
worst case per example across attacks (and restarts), per-member white-box curves, and the
sanity checks (DVERGE eval_wbox; iGAT sec. 6.1; SMD sec. 4.2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from phalanx.attacks import Attack, GradientAttack, output_kind, pgd
from phalanx.data import Split
from phalanx.evaluation.robustness import robust_correct
from phalanx.evaluation.sanity import SanityCheck, gradient_sanity_checks
from phalanx.types import Norm, ThreatModel, check_eps


def _acc(ok: torch.Tensor) -> float:
    return float(ok.float().mean()) if len(ok) else 0.0


def whitebox_evaluation(model: nn.Module, split: Split, eps_list: Sequence[float],
                        attacks: Mapping[str, Attack], *, member_attack: Attack | None = None,
                        members: bool = True, sanity: bool = True, sanity_factor: int = 4,
                        norm: Norm = Norm.LINF,
                        batch_size: int = 500, generator: torch.Generator | None = None,
                        progress: bool = False) -> dict[str, Any]:
    """Curves per attack, the per-example worst case over all attacks, and (for an ensemble
    with ``members``) each member's curve under ``member_attack`` (default: the first attack).

    Returns a JSON-ready dict: ``eps``, ``n``, ``output`` (what the losses saw), ``curves``
    (name -> [{eps, accuracy, n}]), ``worst_case``, ``member_curves`` and ``sanity`` (a list
    of checks at the middle non-zero eps: FGSM vs the first multi-step gradient attack, and that
    attack vs ``sanity_factor`` times its steps).
    """
    eps_checked = [check_eps(e) for e in eps_list]
    if not attacks:
        from phalanx.errors import PhalanxError

        raise PhalanxError("whitebox evaluation needs at least one attack")
    curves: dict[str, list[dict[str, Any]]] = {name: [] for name in attacks}
    worst: list[dict[str, Any]] = []
    for eps in eps_checked:
        threat = ThreatModel(norm, eps)
        all_ok: torch.Tensor | None = None
        for name, atk in attacks.items():
            ok = robust_correct(model, split, atk, threat, batch_size=batch_size, generator=generator,
                                progress=progress, desc=f"{name} eps={eps:g}")
            curves[name].append({"eps": eps, "accuracy": _acc(ok), "n": len(ok)})
            all_ok = ok if all_ok is None else torch.minimum(all_ok, ok)
        assert all_ok is not None
        worst.append({"eps": eps, "accuracy": _acc(all_ok), "n": len(all_ok)})
    member_curves: dict[str, list[dict[str, Any]]] = {}
    mods = getattr(model, "members", None)
    if members and mods is not None and len(mods) > 1:
        # the first attack defined on single models (MORA and ARC need an ensemble), else PGD
        atk = member_attack or next((a for a in attacks.values() if not a.ensemble_only), pgd())
        for i, member in enumerate(mods):
            pts = []
            for eps in eps_checked:
                ok = robust_correct(member, split, atk, ThreatModel(norm, eps), batch_size=batch_size,
                                    generator=generator, progress=progress, desc=f"member {i} eps={eps:g}")
                pts.append({"eps": eps, "accuracy": _acc(ok), "n": len(ok)})
            member_curves[f"member {i}"] = pts
    checks: list[SanityCheck] = []
    nonzero = [e for e in eps_checked if e > 0]
    grad_atk: GradientAttack | None = next((a for a in attacks.values() if isinstance(a, GradientAttack)
                                            and a.steps > 1 and not a.joint), None)
    if sanity and nonzero:
        checks = gradient_sanity_checks(model, split, nonzero[len(nonzero) // 2], grad_atk or cast(GradientAttack, pgd(steps=20)),
                                        factor=sanity_factor, batch_size=batch_size, generator=generator, norm=norm)
    return {"protocol": "whitebox", "eps": eps_checked, "n": len(split), "output": output_kind(model),
            "attacks": {name: describe_attack(a) for name, a in attacks.items()},
            "curves": curves, "worst_case": worst, "member_curves": member_curves,
            "sanity": [c.to_dict() for c in checks]}


def describe_attack(attack: Attack) -> dict[str, Any]:
    """The attack's settings as a JSON-ready dict (dataclass fields)."""
    import dataclasses

    if dataclasses.is_dataclass(attack):
        return {f.name: getattr(attack, f.name) for f in dataclasses.fields(attack)}
    return {"name": attack.name}


__all__ = ["describe_attack", "whitebox_evaluation"]
