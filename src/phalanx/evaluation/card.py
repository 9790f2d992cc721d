"""The robustness card: the strongest evaluation phalanx has for an ensemble's combiner, the
per-example worst case over all of it, which attack found each break, and flags for gradient
masking (Carlini et al. 2019, "On evaluating adversarial robustness"; MORA, Yu et al. 2022;
ARC, Dbouk and Shanbhag 2022).

Deterministic combiners: PGD on the combined output, AutoAttack, MORA (ensembles of >= 2) and
transfer of AutoAttack/MORA examples from an independently trained standard ensemble.
Randomized ensembles: PGD on the combined output, single-sample PGD, EOT-PGD, EOT-APGD and ARC,
plus the transfer. Accuracies of randomized ensembles are exact expectations over the draw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from phalanx.attacks import Attack, create_attack, is_randomized
from phalanx.data import Split
from phalanx.evaluation.robustness import robust_correct
from phalanx.evaluation.sanity import (
    SanityCheck,
    check_blackbox_vs_whitebox,
    check_far_below,
    check_monotone,
    gradient_sanity_checks,
)
from phalanx.evaluation.whitebox import describe_attack
from phalanx.types import Norm, ThreatModel, check_eps

#: reduced budgets (``quick=True``), for demos and smoke tests; the defaults are the published ones
QUICK: dict[str, dict[str, Any]] = {
    "pgd": {"steps": 10}, "single-sample-pgd": {"steps": 10}, "eot-pgd": {"steps": 10},
    "autoattack": {"n_iter": 10, "n_target_classes": 3, "n_queries": 100, "fab_iter": 10},
    "eot-apgd": {"n_iter": 10}, "mora": {"n_iter": 10, "n_target_classes": 3}, "arc": {"steps": 5},
}
#: the attack family each card attack belongs to (one plot per family)
FAMILIES = {"pgd": "gradient", "single-sample-pgd": "gradient", "eot-pgd": "gradient",
            "autoattack": "AutoAttack", "eot-apgd": "AutoAttack", "mora": "MORA", "arc": "ARC"}
TRANSFER_FROM = ("autoattack", "mora")


def _registry_name(name: str) -> str:
    return "eot-pgd" if name == "single-sample-pgd" else name


def card_attacks(model: nn.Module, *, quick: bool = False) -> dict[str, Attack]:
    """The card's white-box attacks for ``model``'s combiner (module docstring)."""
    randomized = is_randomized(model)
    members = getattr(model, "members", None)
    if randomized:
        names = ["pgd", "single-sample-pgd", "eot-pgd", "eot-apgd", "arc"]
    else:
        names = ["pgd", "autoattack"] + (["mora"] if members is not None and len(members) > 1 else [])
    out = {}
    for name in names:
        kw: dict[str, Any] = {"samples": 1} if name == "single-sample-pgd" else {}
        if quick:
            kw.update(QUICK[name])
        out[name] = create_attack(_registry_name(name), **kw)
    return out


def _acc(t: Tensor) -> float:
    return float(t.float().mean()) if len(t) else 0.0


def robustness_card(model: nn.Module, split: Split, eps_list: Sequence[float], *,
                    attacks: Mapping[str, Attack] | None = None, source: nn.Module | None = None,
                    source_name: str = "standard ensemble", quick: bool = False, sanity: bool = True,
                    far_below: float = 0.05, norm: Norm = Norm.LINF, batch_size: int = 500,
                    generator: torch.Generator | None = None, progress: bool = False) -> dict[str, Any]:
    """Run the card on ``split`` at each eps; ``source`` (a standard ensemble trained apart)
    adds the transfer attacks. Returns a JSON-ready dict: ``curves`` per attack, ``worst_case``,
    ``found_by`` (per eps: how many breaks each attack found first, and how many only it found),
    ``flags`` (gradient-masking checks) and the attack settings."""
    eps_checked = [check_eps(e) for e in eps_list]
    atks = dict(attacks) if attacks is not None else card_attacks(model, quick=quick)
    transfer: dict[str, Attack] = {}
    if source is not None:
        src_atks = card_attacks(source, quick=quick)
        transfer = {f"transfer-{n}": src_atks[n] for n in TRANSFER_FROM if n in src_atks}
    curves: dict[str, list[dict[str, Any]]] = {n: [] for n in [*atks, *transfer]}
    worst: list[dict[str, Any]] = []
    found: list[dict[str, Any]] = []
    flags: list[SanityCheck] = []
    for eps in eps_checked:
        threat = ThreatModel(norm, eps)
        per: dict[str, Tensor] = {}
        for name, atk in atks.items():
            per[name] = robust_correct(model, split, atk, threat, batch_size=batch_size, generator=generator,
                                       progress=progress, desc=f"card {name} eps={eps:g}")
        for name, atk in transfer.items():
            assert source is not None
            per[name] = robust_correct(model, split, atk, threat, batch_size=batch_size, generator=generator,
                                       progress=progress, desc=f"card {name} eps={eps:g}", source=source)
        for name, ok in per.items():
            curves[name].append({"eps": eps, "accuracy": _acc(ok), "n": len(ok)})
        stack = torch.stack(list(per.values()))  # (A, N)
        low, arg = stack.min(0)
        worst.append({"eps": eps, "accuracy": _acc(low), "n": len(low)})
        names = list(per)
        broken = low < 1.0
        first = {n: 0 for n in names}
        only = {n: 0 for n in names}
        for i in broken.nonzero().squeeze(1).tolist():
            first[names[int(arg[i])]] += 1
            hits = (stack[:, i] <= low[i]).nonzero().squeeze(1).tolist()
            if len(hits) == 1:
                only[names[hits[0]]] += 1
        found.append({"eps": eps, "breaks": int(broken.sum()), "found_first_by": first, "only_by": only})
        if eps > 0:
            flags += _masking_flags(per, eps, far_below, randomized=is_randomized(model))
    for name, pts in [*curves.items(), ("worst case", worst)]:
        flags.append(check_monotone(name, [(p["eps"], p["accuracy"]) for p in pts]))
    nonzero = [e for e in eps_checked if e > 0]
    pgd_atk = atks.get("pgd")
    if sanity and nonzero and pgd_atk is not None:
        flags += gradient_sanity_checks(model, split, nonzero[len(nonzero) // 2], pgd_atk,  # type: ignore[arg-type]
                                        factor=2 if quick else 4, batch_size=batch_size, generator=generator,
                                        norm=norm)
    fam: dict[str, list[str]] = {}
    for name in curves:
        fam.setdefault("transfer" if name.startswith("transfer-") else FAMILIES.get(name, name), []).append(name)
    return {"protocol": "card", "eps": eps_checked, "n": len(split),
            "combiner": getattr(getattr(model, "combiner", None), "value", "single model"),
            "randomized": is_randomized(model), "quick": quick,
            "attacks": {n: describe_attack(a) for n, a in atks.items()},
            "transfer": {"source": source_name if source is not None else None,
                         "attacks": {n: describe_attack(a) for n, a in transfer.items()}},
            "families": fam, "curves": curves, "worst_case": worst, "found_by": found,
            "flags": [c.to_dict() for c in flags]}


def _masking_flags(per: Mapping[str, Tensor], eps: float, gap: float, *, randomized: bool) -> list[SanityCheck]:
    """MORA, transfer or ARC far below the gradient attack on the combined output (or EOT below
    single-sample PGD); black-box transfer below the white-box worst case."""
    acc = {n: _acc(t) for n, t in per.items()}
    base = "eot-pgd" if randomized else "pgd"
    pairs = [(n, base) for n in acc if n in ("mora", "arc") or n.startswith("transfer-")]
    if randomized:
        pairs += [("eot-pgd", "single-sample-pgd"), ("eot-pgd", "pgd")]
    out = [check_far_below(a, acc[a], b, acc[b], eps, gap) for a, b in pairs if a in acc and b in acc]
    white = [t for n, t in per.items() if not n.startswith("transfer-")]
    black = [t for n, t in per.items() if n.startswith("transfer-")]
    if white and black:
        out.append(check_blackbox_vs_whitebox(_acc(torch.stack(black).min(0).values),
                                              _acc(torch.stack(white).min(0).values), eps))
    return out


__all__ = ["FAMILIES", "QUICK", "card_attacks", "robustness_card"]
