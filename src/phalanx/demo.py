"""``phalanx demo``: a small composition of library calls on the embedded digits data.

The demo is a list of stages; each stage reads and extends a shared :class:`DemoContext`
and contributes a section to the report. Later capabilities add a stage to ``STAGES``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phalanx.cli.config import EvalConfig, RunConfig, build_config
from phalanx.data import DatasetSplits
from phalanx.ensembles import Ensemble, save_ensemble
from phalanx.experiment import evaluate_ensemble, load_data, train_run
from phalanx.reports import curves_table, pct, plot_accuracy_curves, table
from phalanx.runs import environment, write_json, write_results

DEMO_CONFIG: dict[str, Any] = {
    "data": {"dataset": "digits", "seed": 0},
    "model": {"name": "small-cnn", "members": 3},
    "method": {"name": "baseline"},
    "train": {"epochs": 12, "batch_size": 64, "lr": 0.05, "seed": 0, "device": "cpu"},
    "eval": {"eps": [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3], "attack": "pgd", "steps": 20, "limit": 360},
}


@dataclass
class DemoContext:
    out_dir: Path
    config: RunConfig
    data: DatasetSplits
    progress: bool = True
    ensembles: dict[str, Ensemble] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


Stage = Callable[[DemoContext], None]


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


from phalanx.evaluation.demo_stage import stage_attacks  # noqa: E402
from phalanx.training.demo_stage import stage_diversity_training  # noqa: E402
from phalanx.verification.demo_stage import stage_verified_selection  # noqa: E402

STAGES: list[Stage] = [stage_train_baseline, stage_attacks, stage_diversity_training, stage_verified_selection]


def run_demo(out_dir: str | Path, *, progress: bool = True, overrides: dict[str, Any] | None = None,
             stages: list[Stage] | None = None) -> DemoContext:
    """Run every stage, then write ``results.json`` and ``report.md`` into ``out_dir``."""
    tree = {k: dict(v) for k, v in DEMO_CONFIG.items()}
    for sec, vals in (overrides or {}).items():
        tree.setdefault(sec, {}).update(vals)
    cfg = build_config(tree)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(out, cfg, load_data(cfg.data), progress)
    write_json(out / "environment.json", environment(cfg.train.seed, cfg.train.device))
    write_json(out / "config.json", cfg.to_dict())
    t_all = time.perf_counter()
    for stage in stages if stages is not None else STAGES:
        t0 = time.perf_counter()
        stage(ctx)
        ctx.timings[stage.__name__] = round(time.perf_counter() - t0, 2)
    ctx.timings["total"] = round(time.perf_counter() - t_all, 2)
    for name, ens in ctx.ensembles.items():
        save_ensemble(ens, out / f"{name}.pt", dataset=ctx.data.name)
    write_results(out, "demo", {"config": cfg.to_dict(), "results": ctx.results, "timings_s": ctx.timings})
    header = ["# phalanx demo", "",
              f"Dataset: scikit-learn digits (8x8), {len(ctx.data.train)} train / {len(ctx.data.val)} "
              f"validation / {len(ctx.data.test)} test images. Total time {ctx.timings['total']:.0f} s.", ""]
    (out / "report.md").write_text("\n".join(header + ctx.sections) + "\n")
    return ctx


__all__ = ["DEMO_CONFIG", "STAGES", "DemoContext", "EvalConfig", "Stage", "run_demo"]
