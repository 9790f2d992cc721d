"""Demo stage 1: a baseline ensemble, trained and evaluated under PGD."""

from __future__ import annotations

from phalanx.demo.context import DemoContext
from phalanx.reports import curves_table, pct, plot_accuracy_curves, table
from phalanx.workflows.experiment import evaluate_ensemble, train_run


def stage_train_baseline(ctx: DemoContext) -> None:
    """Train a 3-member baseline ensemble and report its clean and PGD accuracy."""
    run_dir = ctx.out_dir / "baseline"
    ens, fit_result, _ = train_run(ctx.config, run_dir, progress=ctx.progress, data=ctx.data)
    ctx.ensembles["baseline"] = ens
    ev = evaluate_ensemble(ens, ctx.data, ctx.config.eval, seed=ctx.config.train.seed, progress=ctx.progress)
    ctx.results["baseline"] = {"history": fit_result.history, "evaluation": ev}
    plot_accuracy_curves({"baseline (PGD)": ev["curve"]}, ctx.out_dir / "robust_accuracy.png",
                         title="Digits: ensemble accuracy under PGD")
    clean = ev["clean"]
    ctx.sections += [
        "## Baseline ensemble", "",
        f"{ctx.config.model.members} x `{ctx.config.model.name}` trained independently for "
        f"{ctx.config.train.epochs} epochs (checkpoint: `baseline/ensemble.pt`).", "",
        table(["model", "clean test accuracy"], [["ensemble", pct(clean["accuracy"])]] +
              [[f"member {i}", pct(a)] for i, a in enumerate(clean["member_accuracy"])]), "",
        f"### Robust accuracy under PGD-{ctx.config.eval.steps} (L-inf)", "",
        curves_table({"baseline": ev["curve"]}), "", "![robust accuracy](robust_accuracy.png)", "",
    ]
