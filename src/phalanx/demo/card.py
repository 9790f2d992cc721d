"""The demo stage of the robustness card: the baseline and the DVERGE ensembles under PGD,
AutoAttack, MORA and transfer from an independently trained standard ensemble, with the
per-example worst case and the gradient-masking flags (reduced attack budgets: a demo)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from phalanx.evaluation.card import robustness_card
from phalanx.reports.evaluation_report import card_section
from phalanx.reports.markdown import pct, table
from phalanx.workflows.evaluation import standard_ensemble

if TYPE_CHECKING:  # pragma: no cover
    from phalanx.demo.context import DemoContext

#: eps on digits' scale, at most ``limit`` test examples, the transfer source trained briefly
DEMO_CARD = {"eps": (0.0, 0.1), "limit": 60, "source_epochs": 3}


def stage_card(ctx: DemoContext) -> None:
    """Robustness cards of the baseline and (when trained) the DVERGE ensemble."""
    quick = ctx.config.train.epochs <= 2
    limit = 30 if quick else int(DEMO_CARD["limit"])  # type: ignore[call-overload]
    split = ctx.data.test.subset(min(limit, len(ctx.data.test)))
    eps = list(DEMO_CARD["eps"])  # type: ignore[call-overload]
    seed = ctx.config.train.seed
    source = standard_ensemble(ctx.ensembles["baseline"], ctx.data, epochs=1 if quick else int(DEMO_CARD["source_epochs"]),  # type: ignore[call-overload]
                               seed=1000 + seed, progress=ctx.progress)
    cards: dict[str, Any] = {}
    lines = ["## Robustness cards", "",
             f"Each ensemble under PGD, AutoAttack and MORA on its combined output and under AutoAttack/MORA examples "
             f"transferred from an independently trained standard ensemble of the same architecture; {len(split)} test "
             "images, reduced attack budgets (`phalanx evaluate CKPT --protocol card` runs the published ones).", ""]
    for name in ("baseline", "dverge"):
        ens = ctx.ensembles.get(name)
        if ens is None:
            continue
        cards[name] = robustness_card(ens.eval(), split, eps, source=source, quick=True, sanity=False,
                                      generator=torch.Generator().manual_seed(seed))
    top = eps[-1]
    cols = ["pgd", "autoattack", "mora", "transfer-autoattack", "transfer-mora"]
    rows = [[n, *(pct(c["curves"][k][-1]["accuracy"]) for k in cols), pct(c["worst_case"][-1]["accuracy"]),
             sum(not f["passed"] for f in c["flags"])] for n, c in cards.items()]
    lines += [f"Accuracy at eps {top:g}:", "", table(["ensemble", *cols, "worst case", "flags raised"], rows), ""]
    for name, card in cards.items():
        body = card_section(card, ctx.out_dir, f"{name}_")
        body[0] = f"### Robustness card: {name}"
        lines += [("#" + ln) if ln.startswith("### ") else ln for ln in body]
    ctx.results["card"] = cards
    ctx.sections += lines


__all__ = ["DEMO_CARD", "stage_card"]
