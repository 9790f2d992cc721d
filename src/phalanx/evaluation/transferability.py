"""Within-ensemble protocols on the examples every member classifies correctly:

- the M x (M+1) transferability matrix (DVERGE sec. 4.2, eval_transferability.py): row i = PGD
  against member i alone, column j = success rate on member j, last column = whole ensemble;
  success if any restart succeeds (REFERENCE-FACTS);
- DVERGE's vulnerability-diversity matrix (eq. 2, eval_diversity.py): ``C[i][j]`` = mean CE of
  member j on the distilled images of member i with the *target* label; ``d(i, j) =
  (C[i][j] + C[j][i]) / 2``; a fresh random layer per batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from phalanx.attacks import Attack, GradientAttack, feature_distillation, pgd
from phalanx.data import Split, iterate_batches
from phalanx.ensembles import Ensemble
from phalanx.errors import PhalanxError
from phalanx.evaluation.clean import model_device
from phalanx.types import Norm, ThreatModel, check_eps


@torch.no_grad()
def correct_by_all(ensemble: Ensemble, split: Split, *, limit: int | None = None, batch_size: int = 500) -> Split:
    """The examples of ``split`` that every member classifies correctly (at most ``limit``)."""
    device = model_device(ensemble)
    keep = []
    for x, y in iterate_batches(split, batch_size):
        keep.append((ensemble.member_logits(x.to(device)).argmax(-1) == y.to(device)).all(0).cpu())
    mask = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.bool)
    idx = mask.nonzero().squeeze(1)
    if limit is not None:
        idx = idx[:limit]
    return Split(split.x[idx], split.y[idx])


def transferability_matrix(ensemble: Ensemble, split: Split, eps: float = 0.03, *, attack: Attack | None = None,
                           restarts: int = 5, limit: int | None = 1000, norm: Norm = Norm.LINF,
                           batch_size: int = 500, generator: torch.Generator | None = None,
                           progress: bool = False) -> dict[str, Any]:
    """M x (M+1) attack-success matrix on examples correct for every member. Default attack:
    PGD-50, step eps/5, random start, 5 restarts (DVERGE). Each restart's examples are scored
    on every target; an example counts as transferred if any restart fools the target."""
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise PhalanxError(f"restarts must be an integer >= 1, got {restarts!r}")
    threat = ThreatModel(norm, check_eps(eps))
    atk = attack or pgd(steps=50, step_size=0.2)
    if isinstance(atk, GradientAttack):
        atk = atk.with_(restarts=1)
    data = correct_by_all(ensemble, split, limit=limit, batch_size=batch_size)
    m = len(ensemble)
    device = model_device(ensemble)
    success = torch.zeros(m, m + 1, dtype=torch.long)
    batches = list(iterate_batches(data, batch_size))
    todo = [(i, b) for i in range(m) for b in range(len(batches))]
    it: Any = todo
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(todo, desc=f"transferability eps={eps:g}", leave=False)
    for i, b in it:
        x, y = (t.to(device) for t in batches[b])
        fooled = torch.zeros(m + 1, x.shape[0], dtype=torch.bool, device=device)
        for _ in range(restarts):
            adv = atk(ensemble.members[i], x, y, threat, generator=generator)
            with torch.no_grad():
                z = ensemble.member_logits(adv)
                fooled[:m] |= z.argmax(-1) != y
                fooled[m] |= ensemble(adv).argmax(-1) != y
        success[i] += fooled.sum(1).cpu()
    n = len(data)
    rate = (success.double() / max(n, 1)).tolist()
    off = [rate[i][j] for i in range(m) for j in range(m) if i != j]
    return {"protocol": "transferability", "eps": threat.eps, "n": n, "restarts": restarts,
            "matrix": rate, "rows": [f"member {i}" for i in range(m)],
            "columns": [f"member {j}" for j in range(m)] + ["ensemble"],
            "mean_pairwise": sum(off) / len(off) if off else None}


def diversity_matrix(ensemble: Ensemble, split: Split, *, eps: float = 0.07, steps: int = 10,
                     limit: int | None = 1000, batch_size: int = 10, layers: tuple[int, ...] | None = None,
                     generator: torch.Generator | None = None, progress: bool = False) -> dict[str, Any]:
    """DVERGE eq. (2) on examples correct for every member.

    For each batch (DVERGE: 10 examples), sources ``x_s`` are a random permutation of the set,
    each member ``i`` distils the features of the target ``x`` at a random layer ``l`` (one draw
    per batch shared by all members, as eval_diversity.py; where depths differ the draw maps to
    the same relative depth; ``layers`` restricts the choice) into
    ``x_s`` (eps 0.07, 10 steps of eps/10, momentum), and ``C[i][j]`` accumulates
    ``CE(f_j(x'_i), y)``. Returns ``ce`` (M x M), ``diversity`` (symmetric ``d(i, j)``,
    diagonal 0) and ``mean_pairwise``. Models are left in the mode the caller set (eval)."""
    eps = check_eps(eps)
    data = correct_by_all(ensemble, split, limit=limit)
    n = len(data)
    m = len(ensemble)
    device = model_device(ensemble)
    if n == 0:
        raise PhalanxError("no example is classified correctly by every member; cannot measure diversity")
    perm = torch.randperm(n, generator=generator)
    sources = data.x[perm]
    total = torch.zeros(m, m, dtype=torch.float64)
    batches = range(0, n, batch_size)
    it: Any = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="diversity", leave=False)
    choices_per = []
    for i, member in enumerate(ensemble.members):
        depth = int(getattr(member, "num_feature_layers"))  # noqa: B009
        choices = [layer for layer in (layers or range(1, depth + 1)) if 1 <= layer <= depth]
        if not choices:
            raise PhalanxError(f"no valid feature layer in {layers} for member {i} (1..{depth})")
        choices_per.append(choices)
    for start in it:
        x = data.x[start:start + batch_size].to(device)
        y = data.y[start:start + batch_size].to(device)
        xs = sources[start:start + batch_size].to(device)
        u = float(torch.rand((), generator=generator))  # one layer draw per batch (eval_diversity.py)
        for i, member in enumerate(ensemble.members):
            layer = choices_per[i][min(int(u * len(choices_per[i])), len(choices_per[i]) - 1)]
            adv = feature_distillation(member, xs, x, layer, eps=eps, steps=steps, step_size=eps / steps)  # type: ignore[arg-type]
            with torch.no_grad():
                z = ensemble.member_logits(adv)
                for j in range(m):
                    total[i, j] += F.cross_entropy(z[j], y, reduction="sum").double().cpu()
    ce = total / n
    div = 0.5 * (ce + ce.T)
    div.fill_diagonal_(0.0)
    off = [float(div[i, j]) for i in range(m) for j in range(m) if i != j]
    return {"protocol": "diversity", "eps": eps, "n": n, "steps": steps, "ce": ce.tolist(),
            "diversity": div.tolist(), "mean_pairwise": sum(off) / len(off) if off else None}




__all__ = ["correct_by_all", "diversity_matrix", "transferability_matrix"]
