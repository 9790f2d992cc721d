"""``phalanx demo``: a small composition of library calls on the embedded digits data.

The demo uses the library and is used by nothing. It is a list of stages (one module each); each stage reads and extends a shared :class:`DemoContext`
and contributes a section to the report. Later capabilities add a stage to ``STAGES``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from phalanx.config import build_config
from phalanx.demo.attacks import stage_attacks
from phalanx.demo.baseline import stage_train_baseline
from phalanx.demo.card import stage_card
from phalanx.demo.context import DemoContext, Stage
from phalanx.demo.diversity import stage_diversity_training
from phalanx.demo.selection import stage_verified_selection
from phalanx.ensembles import save_ensemble
from phalanx.runs import environment, write_json, write_results
from phalanx.workflows.experiment import load_data

DEMO_CONFIG: dict[str, Any] = {
    "data": {"dataset": "digits", "seed": 0},
    "model": {"name": "small-cnn", "members": 3},
    "method": {"name": "baseline"},
    "train": {"epochs": 12, "batch_size": 64, "lr": 0.05, "seed": 0, "device": "cpu"},
    "eval": {"eps": [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3], "attack": "pgd", "steps": 20, "limit": 360},
}


STAGES: list[Stage] = [stage_train_baseline, stage_attacks, stage_diversity_training, stage_card,
                       stage_verified_selection]


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


__all__ = ["DEMO_CONFIG", "STAGES", "DemoContext", "Stage", "run_demo", "stage_attacks", "stage_card",
           "stage_diversity_training",
           "stage_train_baseline", "stage_verified_selection"]
