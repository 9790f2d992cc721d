"""Verification reports: score tables, selection history and counterexample images, rendered
from result dictionaries and the query store only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from phalanx.reports.plots import save_figure
from phalanx.verification.query import Verdict
from phalanx.verification.runner import Record


def plot_counterexamples(records: Sequence[Record], points: np.ndarray, in_shape: tuple[int, ...], path: str | Path,
                         *, limit: int = 6, title: str = "") -> Path | None:
    """Clean (top) vs perturbed (bottom) inputs of SAT queries, with each member's label."""
    from phalanx.reports.plots import _plt

    sat = [r for r in records if r.result.verdict is Verdict.SAT and r.result.counterexample is not None][:limit]
    if not sat:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, len(sat), figsize=(1.6 * len(sat) + 0.4, 3.6), dpi=120, squeeze=False)
    for k, r in enumerate(sat):
        clean = points[r.spec.point].reshape(in_shape)
        adv = np.asarray(r.result.counterexample).reshape(in_shape)
        labels = r.result.details.get("member_labels", [])
        for row, img in enumerate((clean, adv)):
            ax = axes[row][k]
            im = img.transpose(1, 2, 0) if img.shape[0] == 3 else img[0]
            ax.imshow(np.clip(im, 0, 1), cmap=None if img.shape[0] == 3 else "gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"y={r.spec.label} eps={r.spec.eps:g}", fontsize=7)
            else:
                names = " ".join(f"N{m}:{lab}" for m, lab in zip(r.spec.members, labels, strict=False))
                ax.set_title(names, fontsize=6, color="red")
    return save_figure(fig, path, title=title)


def verdict_summary(records: Sequence[Record]) -> dict[str, Any]:
    """Counts per verdict and per deciding backend, and time statistics."""
    by_v: dict[str, int] = {}
    by_b: dict[str, int] = {}
    times = [r.result.wall_time_s for r in records]
    for r in records:
        by_v[r.result.verdict.value] = by_v.get(r.result.verdict.value, 0) + 1
        by_b[r.result.backend] = by_b.get(r.result.backend, 0) + 1
    return {"queries": len(records), "verdicts": by_v, "decided_by": by_b,
            "mean_time_s": float(np.mean(times)) if times else 0.0,
            "max_time_s": float(np.max(times)) if times else 0.0}


def summary_markdown(summary: dict[str, Any]) -> str:
    from phalanx.reports import table

    rows = [[k, v] for k, v in sorted(summary["verdicts"].items())]
    rows += [[f"decided by {k}", v] for k, v in sorted(summary["decided_by"].items())]
    rows.append(["mean / max time per query (s)", f"{summary['mean_time_s']:.3f} / {summary['max_time_s']:.3f}"])
    return table(["", f"{summary['queries']} queries"], rows)


def robust_markdown(val: dict[str, Any]) -> str:
    from phalanx.reports import table

    rows = [[r["eps"], f"{100 * r['verified_robust_accuracy']:.1f}", f"{100 * r['robust_accuracy_upper']:.1f}",
             f"{100 * r['pgd_robust_accuracy']:.1f}", r["sat"], r["unsat"], r["undecided"]] for r in val["rows"]]
    members = " ".join(f"N{i}" for i in val["members"])
    return f"Ensemble {members} ({val['combiner']}):\n\n" + table(
        ["eps", "verified robust acc %", "upper bound %", "PGD robust acc %", "SAT", "UNSAT", "undecided"], rows)
