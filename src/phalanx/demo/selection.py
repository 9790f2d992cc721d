"""The demo's verification stage: a small verified selection on digits MLPs (Amir et al. 2022)."""

from __future__ import annotations

from typing import Any

import torch

from phalanx.verification.report import plot_counterexamples, robust_markdown
from phalanx.verification.runner import Candidates, ResultStore
from phalanx.verification.scores import agreement_points
from phalanx.verification.selection import SelectionConfig, select_members, verified_robust_accuracy

DEMO_EPS = (0.08, 0.15)
VALIDATION_EPS = (0.1,)


def stage_verified_selection(ctx: Any) -> None:
    """Train 5 one-hidden-layer digits MLPs (16 units), choose 3 by uniqueness scores from formally
    verified pairwise mutual errors on agreement points, and verify the ensembles before/after."""
    from phalanx import Ensemble, TrainConfig, create_method, create_model, fit
    from phalanx.runs import write_json


    data = ctx.data
    torch.manual_seed(11)
    members = [create_model("mlp", data.in_shape, data.num_classes, mean=data.mean, std=data.std, widths=[16])
               for _ in range(5)]
    for s, m in enumerate(members):  # independent training runs, as the paper's candidates
        fit(Ensemble([m]), create_method("baseline"), data,
            TrainConfig(epochs=4, batch_size=64, lr=0.05, seed=100 + s, device="cpu"), progress=False)
        m.eval()
    cands = Candidates.from_models(members)
    idx = agreement_points(cands.models, data.val.x, data.val.y, count=8)
    pts = data.val.x[idx].reshape(len(idx), -1).double().numpy()
    out_dir = ctx.out_dir / "verification"
    out_dir.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out_dir / "queries.jsonl")
    res = select_members(cands, pts, data.val.y[idx].tolist(),
                         SelectionConfig(k=3, eps=DEMO_EPS, time_limit_s=20, max_iters=2), store=store)
    tx, ty = data.test.x[:25], data.test.y[:25]
    before = verified_robust_accuracy(cands, res.initial, tx, ty, VALIDATION_EPS, time_limit_s=20, pgd_steps=20,
                                      pgd_restarts=1)
    after = verified_robust_accuracy(cands, res.final, tx, ty, VALIDATION_EPS, time_limit_s=20, pgd_steps=20,
                                     pgd_restarts=1) if res.final != res.initial else before
    img = plot_counterexamples(list(store.records.values()), pts, cands.nets[0].in_shape,
                               ctx.out_dir / "verification_counterexamples.png",
                               title="verified mutual errors: clean (top), perturbed (bottom)")
    result = {"selection": res.to_json(), "before": before, "after": after, "agreement_points": len(pts),
              "queries": len(store.records)}
    write_json(out_dir / "results.json", result)
    ctx.results["verification"] = result
    lines = ["## Verification-aided ensemble selection", "",
             f"5 digits MLPs (64-16-10), {len(pts)} agreement points, eps {list(DEMO_EPS)}, "
             f"{len(store.records)} pairwise mutual-error queries solved by the portfolio "
             "(joint attack G.A. 3, linear bounds, exact MILP).", "",
             res.final_table.markdown(), "", res.markdown(), "",
             "Verified robust accuracy on 25 test points (mean-logits ensemble):", "",
             robust_markdown(before), ""]
    if res.final != res.initial:
        lines += [robust_markdown(after), ""]
    if img is not None:
        lines += [f"![verified counterexamples]({img.name})", ""]
    ctx.sections.append("\n".join(lines))
